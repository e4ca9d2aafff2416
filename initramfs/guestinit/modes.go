package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

// listen waits for the interface, gives it guest.addr, brings it and the
// loopback up, and listens on guest.addr and guest.port.
func listen(c config) (net.Listener, error) {
	if err := boot.WaitLink(c.iface, c.timeout); err != nil {
		return nil, fmt.Errorf("no network interface: %w", err)
	}
	if err := boot.SetAddr(c.iface, c.addr); err != nil {
		return nil, err
	}
	for _, link := range []string{"lo", c.iface} {
		if err := boot.LinkUp(link); err != nil {
			return nil, err
		}
	}
	return net.Listen("tcp4", net.JoinHostPort(c.addr.Addr().String(), strconv.Itoa(int(c.port))))
}

// serve configures the interface and answers one TCP connection.
func serve(out io.Writer, c config) error {
	ln, err := listen(c)
	if err != nil {
		return err
	}
	defer ln.Close()
	fmt.Fprintf(out, "%slistening on %s (%s)\n", prefix, ln.Addr(), c.iface)
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(c.timeout))
	conn, err := ln.Accept()
	if err != nil {
		return fmt.Errorf("no connection within %v: %w", c.timeout, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, answer); err != nil {
		return fmt.Errorf("answer %s: %w", conn.RemoteAddr(), err)
	}
	// Send FIN and wait for the peer to close its side, so that the answer
	// has arrived before the machine powers off.
	conn.(*net.TCPConn).CloseWrite()
	if _, err := io.Copy(io.Discard, io.LimitReader(conn, 1<<20)); err != nil {
		fmt.Fprintf(out, "%sanswered %s, which did not close: %v\n", prefix, conn.RemoteAddr(), err)
		return nil
	}
	fmt.Fprintf(out, "%sanswered %s\n", prefix, conn.RemoteAddr())
	return nil
}

// readDisk prints the text at each of boot.TestDiskOffsets of the disk: the bytes up
// to the first newline or NUL, quoted.
func readDisk(out io.Writer, c config) error {
	if err := boot.WaitDevice(c.disk, c.timeout); err != nil {
		return fmt.Errorf("no disk: %w", err)
	}
	f, err := os.Open(c.disk)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for _, off := range boot.TestDiskOffsets {
		n, err := f.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			return fmt.Errorf("read %s at %d: %w", c.disk, off, err)
		}
		fmt.Fprintf(out, "%sdisk %s offset %d: %q\n", prefix, c.disk, off, textAt(buf[:n]))
	}
	return nil
}

// textAt returns b up to its first newline or NUL.
func textAt(b []byte) []byte {
	if i := bytes.IndexAny(b, "\n\x00"); i >= 0 {
		return b[:i]
	}
	return b
}

// maxEchoLine bounds the line echo mode reads.
const maxEchoLine = 256

// echoConsole opens the serial console, prints boot.EchoPrompt (the
// appliance's understudy.stdin= waits for it) and reads one
// line from it, then prints it back quoted.
func echoConsole(out io.Writer, c config) error {
	f, err := os.OpenFile(c.console, os.O_RDONLY|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(out, "%s on %s\n", boot.EchoPrompt, c.console)
	line, err := readLine(f, c.timeout)
	if err != nil {
		return fmt.Errorf("read a line from %s: %w", c.console, err)
	}
	fmt.Fprintf(out, "%secho: got %q\n", prefix, line)
	return nil
}

// echoForever is echo mode's loop for services that run until the machine
// stops (guest.mode=kv): it prints boot.EchoPrompt, reads a line with no
// time limit, prints it back quoted, and again, so that the console can be
// checked at any time, after a snapshot's restore or a failover too. It
// returns only if the console fails.
func echoForever(out io.Writer, console string) error {
	f, err := os.OpenFile(console, os.O_RDONLY|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for {
		fmt.Fprintf(out, "%s on %s\n", boot.EchoPrompt, console)
		line, err := readLine(f, 0)
		if err != nil {
			return fmt.Errorf("read a line from %s: %w", console, err)
		}
		fmt.Fprintf(out, "%secho: got %q\n", prefix, line)
	}
}

// readLine reads up to a newline (which it drops, with a carriage return
// before it) from f, within timeout (0: no limit) if f supports deadlines.
func readLine(f *os.File, timeout time.Duration) (string, error) {
	// A terminal opened with os.OpenFile is non-blocking and takes a
	// deadline; where one cannot be set, the read just waits.
	if timeout > 0 {
		_ = f.SetReadDeadline(time.Now().Add(timeout))
	}
	var line []byte
	buf := make([]byte, 64)
	for {
		n, err := f.Read(buf)
		for _, b := range buf[:n] {
			if b == '\n' {
				return strings.TrimSuffix(string(line), "\r"), nil
			}
			if len(line) == maxEchoLine {
				return "", fmt.Errorf("no newline in the first %d bytes", maxEchoLine)
			}
			line = append(line, b)
		}
		if err != nil {
			if len(line) > 0 {
				return "", fmt.Errorf("%w after %q", err, line)
			}
			return "", err
		}
	}
}
