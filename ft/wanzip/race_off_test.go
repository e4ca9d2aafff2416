//go:build !race

package wanzip

const raceEnabled = false
