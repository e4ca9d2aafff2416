package testutil

// SerialEcho is 64-bit guest code (any CPL with I/O access) that waits
// for a byte on COM1 and echoes it: poll LSR.DR, read RBR, write THR. It
// falls through to the code placed after it.
func SerialEcho() []byte {
	return []byte{
		0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd
		0xec,       // in al, dx
		0xa8, 0x01, // test al, 1
		0x74, 0xf7, // jz -9
		0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
		0xec, // in al, dx
		0xee, // out dx, al
	}
}

// SerialEchoLoop is SerialEcho for ever: every byte COM1 receives is echoed.
func SerialEchoLoop() []byte {
	return append(SerialEcho(), 0xeb, 0xef) // jmp -17: back to the start
}
