//go:build race

package ft

// raceEnabled: the race detector slows checkpoints (copies and digests)
// by an order of magnitude, so counts of epochs in a guest run of fixed
// length are not meaningful.
const raceEnabled = true
