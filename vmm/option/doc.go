// Package option parses the small languages of Understudy's options, so
// that every flag reads and fails the same way: comma lists of key=value
// pairs (List.Parse, with known keys and errors that name the option), sizes
// (ParseSize, FormatSize), rates (ParseRate) and bounded numbers and
// durations (Int, Float, Duration).
//
// It imports nothing of Understudy's; the machine (vmm), its large-page
// controller, fault tolerance (ft) and the binary use it. Every parser here
// reads untrusted text and has a fuzz target.
package option
