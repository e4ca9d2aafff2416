package kvstore

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
)

// answerWords are the first words an answer may have.
var answerWords = []string{"HELLO", "OK", "VALUE", "MISSING", "COUNT", "VERIFIED", "PONG", "BYE", "ERR"}

// FuzzConnection feeds a connection arbitrary bytes: the server must answer
// each request line with exactly one well-formed answer line, never panic,
// and keep serving (a final PING is answered unless the input ended the
// connection).
func FuzzConnection(f *testing.F) {
	for _, s := range []string{
		"PUT k v\nGET k\n",
		"PUT k v\r\nCOUNT\r\nVERIFY\nSYNC\n",
		"GET\nPUT\nPUT a b c\n\n\n",
		strings.Repeat("A", MaxLine+5) + "\nPING\n",
		"PUT k \xff\x00\nGET \x00\n",
		"QUIT\nPING\n",
		"POWEROFF\n",
	} {
		f.Add([]byte(s))
	}
	s := mustOpen(f, newDisk(f, f.TempDir(), 4<<20))
	f.Fuzz(func(t *testing.T, in []byte) {
		srv := NewServer(s, nil)
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			srv.serveConn(server, 1)
			close(done)
		}()
		go func() {
			client.Write(in)
			client.Write([]byte("\nPING\n"))
		}()
		r := bufio.NewReader(client)
		var answers []string
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				if err != io.EOF || line != "" {
					t.Fatalf("answer %q, %v", line, err)
				}
				break
			}
			answers = append(answers, line)
			if line == "PONG\n" || line == "BYE\n" || line == "OK powering off\n" {
				break
			}
		}
		client.Close()
		<-done
		for _, a := range answers {
			w, _, _ := strings.Cut(strings.TrimSuffix(a, "\n"), " ")
			found := false
			for _, x := range answerWords {
				found = found || w == x
			}
			if !found || strings.Count(a, "\n") != 1 || strings.Contains(a, "\r") {
				t.Fatalf("answer %q", a)
			}
		}
		if len(answers) < 2 {
			t.Fatalf("answers %q: want the greeting and at least one more", answers)
		}
	})
}
