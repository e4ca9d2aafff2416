// Package bench holds Understudy's machine benchmarks. They run real VMs on
// /dev/kvm and print "bench NAME: key=value ..." result lines; run them with
// `make bench`. Timings on shared machines are noisy, so each line is a median
// over many runs and, where it fits, is shown next to an anchor measured in
// the same run.
package bench
