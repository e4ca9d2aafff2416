// Command nodefile moves files from one appliance node to another over the
// network they share (a snapshot and a disk image, to restore a guest on
// another node). It is in the appliance image as bin/nodefile.
//
//	nodefile send -listen ADDR:PORT [-timeout D] FILE...
//	nodefile recv -from ADDR:PORT -dir DIR [-retry-for D] [-timeout D]
//	nodefile read FILE...
//
// send listens, serves the files to the first receiver that connects and
// exits 0 once the receiver has acknowledged that every file arrived whole;
// a receiver that fails is logged and the next one is served. recv connects
// (retrying until -retry-for passes: the sender may not listen yet), writes
// each file into DIR (as NAME.partial, renamed once its SHA-256 matches),
// acknowledges, and exits 0. Each side prints one line per file with its
// size and SHA-256, so a test can compare the two ends. read reads each
// file once, start to end, and prints its size and how long that took: the
// baseline a restore's time is measured against.
//
// # Protocol
//
// TCP. The sender writes, per file, a header line
//
//	FILE name size sha256hex
//
// and then exactly size bytes; then "END\n". The receiver answers "OK n\n"
// (n files) once every file is renamed into place, or closes the
// connection. Names are base names of 1..MaxName bytes of letters, digits,
// '.', '_' and '-', not starting with '.'; size is at most MaxSize. The
// receiver treats everything it reads as untrusted: parseHeader checks it
// (and is fuzzed).
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Limits on what a receiver accepts.
const (
	MaxName  = 128
	MaxSize  = 64 << 30
	MaxFiles = 64
	maxLine  = 512
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout))
}

func run(args []string, out io.Writer) int {
	say := func(format string, a ...any) { fmt.Fprintf(out, "nodefile: "+format+"\n", a...) }
	if len(args) == 0 {
		say("usage: nodefile send -listen ADDR:PORT FILE... | nodefile recv -from ADDR:PORT -dir DIR | nodefile read FILE...")
		return 2
	}
	fs := flag.NewFlagSet("nodefile "+args[0], flag.ContinueOnError)
	fs.SetOutput(out)
	listen := fs.String("listen", "", "send: the address to listen on")
	from := fs.String("from", "", "recv: the sender's address")
	dir := fs.String("dir", "", "recv: the directory the files go to")
	retryFor := fs.Duration("retry-for", 5*time.Minute, "recv: how long connecting keeps trying")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long the whole transfer may take")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	var err error
	switch args[0] {
	case "send":
		if *listen == "" || fs.NArg() == 0 {
			say("send needs -listen and at least one file")
			return 2
		}
		err = send(*listen, fs.Args(), *timeout, say)
	case "recv":
		if *from == "" || *dir == "" || fs.NArg() > 0 {
			say("recv needs -from and -dir, and no other arguments")
			return 2
		}
		err = recv(*from, *dir, *retryFor, *timeout, say)
	case "read":
		if fs.NArg() == 0 {
			say("read needs at least one file")
			return 2
		}
		err = readFiles(fs.Args(), say)
	default:
		say("unknown command %q: want send, recv or read", args[0])
		return 2
	}
	if err != nil {
		say("FAILED: %v", err)
		return 1
	}
	say("OK")
	return 0
}

// file is one file to send.
type file struct {
	path, name string
	size       int64
	sum        string
}

func hashFile(path string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, "", err
	}
	return n, hex.EncodeToString(h.Sum(nil)), nil
}

// readFiles reads each file once, in 1 MiB reads, and reports its size and
// the time the reads took.
func readFiles(paths []string, say func(string, ...any)) error {
	buf := make([]byte, 1<<20)
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		start := time.Now()
		var n int64
		for {
			k, err := f.Read(buf)
			n += int64(k)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				f.Close()
				return fmt.Errorf("read %s: %w", p, err)
			}
		}
		took := time.Since(start)
		f.Close()
		say("read %s %d bytes in %.1f ms", filepath.Base(p), n, float64(took)/float64(time.Millisecond))
	}
	return nil
}

func send(listen string, paths []string, timeout time.Duration, say func(string, ...any)) error {
	if len(paths) > MaxFiles {
		return fmt.Errorf("more than %d files", MaxFiles)
	}
	var files []file
	seen := map[string]bool{}
	for _, p := range paths {
		name := filepath.Base(p)
		if err := checkName(name); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if seen[name] {
			return fmt.Errorf("two files named %s", name)
		}
		seen[name] = true
		size, sum, err := hashFile(p)
		if err != nil {
			return err
		}
		if size > MaxSize {
			return fmt.Errorf("%s: %d bytes, more than %d", p, size, int64(MaxSize))
		}
		files = append(files, file{p, name, size, sum})
		say("sending %s size=%d sha256=%s", name, size, sum)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	defer ln.Close()
	deadline := time.Now().Add(timeout)
	ln.(*net.TCPListener).SetDeadline(deadline)
	say("listening on %s", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		start := time.Now()
		err = serve(c, files, deadline)
		c.Close()
		if err == nil {
			var total int64
			for _, f := range files {
				total += f.size
			}
			secs := time.Since(start).Seconds()
			say("sent %d files (%d bytes) to %s in %.2fs (%.1f MiB/s)", len(files), total, c.RemoteAddr(), secs, float64(total)/(1<<20)/max(secs, 1e-6))
			return nil
		}
		say("receiver %s: %v", c.RemoteAddr(), err)
	}
}

// serve sends files on c and waits for the receiver's acknowledgement.
func serve(c net.Conn, files []file, deadline time.Time) error {
	c.SetDeadline(deadline)
	w := bufio.NewWriterSize(c, 1<<20)
	for _, f := range files {
		fmt.Fprintf(w, "FILE %s %d %s\n", f.name, f.size, f.sum)
		in, err := os.Open(f.path)
		if err != nil {
			return err
		}
		n, err := io.Copy(w, in)
		in.Close()
		if err != nil {
			return err
		}
		if n != f.size {
			return fmt.Errorf("%s changed while being sent: %d bytes, was %d", f.path, n, f.size)
		}
	}
	io.WriteString(w, "END\n")
	if err := w.Flush(); err != nil {
		return err
	}
	line, err := bufio.NewReader(io.LimitReader(c, maxLine)).ReadString('\n')
	if err != nil {
		return fmt.Errorf("no acknowledgement: %w", err)
	}
	if want := fmt.Sprintf("OK %d\n", len(files)); line != want {
		return fmt.Errorf("acknowledged %q, want %q", line, want)
	}
	return nil
}

func recv(from, dir string, retryFor, timeout time.Duration, say func(string, ...any)) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var c net.Conn
	var err error
	start := time.Now()
	for attempt := 1; ; attempt++ {
		c, err = net.DialTimeout("tcp", from, 5*time.Second)
		if err == nil {
			say("connected to %s (attempt %d)", from, attempt)
			break
		}
		if time.Since(start) > retryFor {
			return fmt.Errorf("connect to %s: %w (tried for %v)", from, err, retryFor)
		}
		time.Sleep(500 * time.Millisecond)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	start = time.Now()
	r := bufio.NewReaderSize(c, 1<<20)
	var total int64
	n := 0
	seen := map[string]bool{}
	for {
		line, err := readLine(r)
		if err != nil {
			return err
		}
		if line == "END" {
			break
		}
		h, err := parseHeader(line)
		if err != nil {
			return err
		}
		if n == MaxFiles {
			return fmt.Errorf("more than %d files", MaxFiles)
		}
		if seen[h.name] {
			return fmt.Errorf("%s sent twice", h.name)
		}
		seen[h.name] = true
		if err := receiveFile(r, dir, h); err != nil {
			return err
		}
		say("received %s size=%d sha256=%s", h.name, h.size, h.sum)
		total += h.size
		n++
	}
	if _, err := fmt.Fprintf(c, "OK %d\n", n); err != nil {
		return err
	}
	secs := time.Since(start).Seconds()
	say("received %d files (%d bytes) from %s in %.2fs (%.1f MiB/s) into %s", n, total, from, secs, float64(total)/(1<<20)/max(secs, 1e-6), dir)
	return nil
}

// readLine reads one line of at most maxLine bytes, without its newline.
func readLine(r *bufio.Reader) (string, error) {
	var b []byte
	for {
		c, err := r.ReadByte()
		if err != nil {
			return "", fmt.Errorf("reading a header: %w", err)
		}
		if c == '\n' {
			return string(b), nil
		}
		if len(b) == maxLine {
			return "", fmt.Errorf("a header line longer than %d bytes", maxLine)
		}
		b = append(b, c)
	}
}

// receiveFile writes h.size bytes from r to dir/h.name through a partial
// file, checking the SHA-256 before renaming it into place.
func receiveFile(r io.Reader, dir string, h file) error {
	final := filepath.Join(dir, h.name)
	partial := final + ".partial"
	f, err := os.Create(partial)
	if err != nil {
		return err
	}
	defer os.Remove(partial) // a no-op once renamed
	hs := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, hs), io.LimitReader(r, h.size))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("%s: %w", h.name, err)
	}
	if n != h.size {
		return fmt.Errorf("%s: the sender stopped after %d of %d bytes", h.name, n, h.size)
	}
	if got := hex.EncodeToString(hs.Sum(nil)); got != h.sum {
		return fmt.Errorf("%s: SHA-256 %s, the sender said %s", h.name, got, h.sum)
	}
	return os.Rename(partial, final)
}

// parseHeader parses "FILE name size sha256hex".
func parseHeader(line string) (file, error) {
	var h file
	f := strings.Split(line, " ")
	if len(f) != 4 || f[0] != "FILE" {
		return h, fmt.Errorf("bad header %.80q: want FILE NAME SIZE SHA256", line)
	}
	if err := checkName(f[1]); err != nil {
		return h, err
	}
	size, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil || size < 0 || size > MaxSize || f[2] != strconv.FormatInt(size, 10) {
		return h, fmt.Errorf("bad size %.40q: want 0..%d", f[2], int64(MaxSize))
	}
	if len(f[3]) != 64 || strings.Trim(f[3], "0123456789abcdef") != "" {
		return h, fmt.Errorf("bad SHA-256 %.80q: want 64 lower-case hex digits", f[3])
	}
	return file{name: f[1], size: size, sum: f[3]}, nil
}

// checkName accepts a plain file name: 1..MaxName letters, digits, '.',
// '_' or '-', not starting with '.' (no "..", no hidden file, no path).
func checkName(s string) error {
	if s == "" || len(s) > MaxName || s[0] == '.' || strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != "" {
		return errors.New("bad file name " + strconv.QuoteToASCII(s) + ": want 1..128 letters, digits, '.', '_' or '-', not starting with '.'")
	}
	return nil
}
