package wire

import (
	"errors"
	"fmt"
)

// Errors a Reader or a decoder returns, wrapped with detail; test for them
// with errors.Is. A frame that ends early is io.ErrUnexpectedEOF.
var (
	// ErrBadMagic: the bytes are not an Understudy frame.
	ErrBadMagic = errors.New("wire: bad magic (not an Understudy frame)")
	// ErrVersion: the frame is of a protocol version this node does not
	// speak. The error is a *VersionError.
	ErrVersion = errors.New("wire: unsupported protocol version")
	// ErrUnknownType: the frame's message type is not one this version defines.
	ErrUnknownType = errors.New("wire: unknown message type")
	// ErrTooLarge: the payload length exceeds MaxPayload.
	ErrTooLarge = errors.New("wire: payload too large")
	// ErrChecksum: a CRC-32C does not match.
	ErrChecksum = errors.New("wire: checksum mismatch")
	// ErrMalformed: a message body (or a frame field) breaks the layout
	// rules: a bad length, count, enum, reserved field or trailing bytes.
	ErrMalformed = errors.New("wire: malformed message")
)

// VersionError reports a frame of a protocol version this node does not
// speak. It matches ErrVersion under errors.Is.
type VersionError struct {
	Got uint8 // the version in the frame header
}

// Error names the version received and the one spoken here.
func (e *VersionError) Error() string {
	return fmt.Sprintf("wire: unsupported protocol version %d (this node speaks %d)", e.Got, Version)
}

// Unwrap makes errors.Is(err, ErrVersion) true.
func (e *VersionError) Unwrap() error { return ErrVersion }

// malformed returns an ErrMalformed with detail about message type t.
func malformed(t Type, format string, args ...any) error {
	return fmt.Errorf("%w: %v: %s", ErrMalformed, t, fmt.Sprintf(format, args...))
}
