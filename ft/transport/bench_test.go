package transport

import (
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

const (
	benchBytes     = 512 << 20 // streamed per iteration
	benchBatchSize = 256       // pages per PageBatch (1 MiB of data)
)

// BenchmarkStream streams 512 MiB of 4 KiB page records in PageBatch
// frames over mutual TLS on loopback TCP, then the same number of bytes
// over a plain loopback TCP socket, and prints the ratio:
//
//	bench ft-transport: mtls_mib_s=X loopback_mib_s=Y ratio=X/Y
func BenchmarkStream(b *testing.B) {
	p := newPKI(b)
	l, err := Listen("tcp://127.0.0.1:0", &Config{Credentials: p.node("int", wire.RoleIntermediary)})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli, err := Dial(ctx, l.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary)})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	srv, err := l.Accept(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()

	raw, rawSrv := loopbackPair(b)
	defer raw.Close()
	defer rawSrv.Close()

	data := make([]byte, benchBatchSize*wire.PageSize)
	for i := range data {
		data[i] = byte(i*31 + i>>12)
	}
	batch := &wire.PageBatch{Epoch: 1, Pages: make([]wire.Page, benchBatchSize)}
	const batches = benchBytes / (benchBatchSize * wire.PageSize)

	var mtls, plain time.Duration
	b.ResetTimer()
	for range b.N {
		// mTLS: the receiver decodes every batch and counts the pages.
		start := time.Now()
		done := make(chan error, 1)
		go func() {
			pages := 0
			for pages < batches*benchBatchSize {
				m, err := srv.ReadMessage()
				if err != nil {
					done <- err
					return
				}
				pb, ok := m.(*wire.PageBatch)
				if !ok {
					done <- fmt.Errorf("got %v, want PageBatch", m.Type())
					return
				}
				pages += len(pb.Pages)
			}
			done <- nil
		}()
		for i := range batches {
			for j := range batch.Pages {
				batch.Pages[j] = wire.Page{PFN: uint64(i*benchBatchSize + j), Data: data[j*wire.PageSize : (j+1)*wire.PageSize]}
			}
			if err := cli.WriteMessage(batch); err != nil {
				b.Fatalf("WriteMessage() = %v", err)
			}
		}
		if err := <-done; err != nil {
			b.Fatalf("receiver: %v", err)
		}
		mtls += time.Since(start)

		// Plain loopback TCP: the same bytes, written in the same chunks.
		start = time.Now()
		go func() {
			n, err := io.CopyN(io.Discard, rawSrv, benchBytes)
			if err == nil && n != benchBytes {
				err = fmt.Errorf("copied %d bytes", n)
			}
			done <- err
		}()
		for range batches {
			if _, err := raw.Write(data); err != nil {
				b.Fatalf("loopback Write() = %v", err)
			}
		}
		if err := <-done; err != nil {
			b.Fatalf("loopback receiver: %v", err)
		}
		plain += time.Since(start)
	}
	b.StopTimer()
	mib := float64(b.N) * benchBytes / (1 << 20)
	mtlsRate, plainRate := mib/mtls.Seconds(), mib/plain.Seconds()
	b.ReportMetric(mtlsRate, "mtls_MiB/s")
	b.ReportMetric(plainRate, "loopback_MiB/s")
	fmt.Printf("bench ft-transport: mtls_mib_s=%.0f loopback_mib_s=%.0f ratio=%.3f\n", mtlsRate, plainRate, mtlsRate/plainRate)
}

// loopbackPair returns both ends of a plain loopback TCP connection.
func loopbackPair(b *testing.B) (client, server net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		b.Fatal("loopback accept failed")
	}
	return client, server
}
