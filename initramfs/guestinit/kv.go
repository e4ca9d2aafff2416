package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"github.com/understudy-vmm/understudy/initramfs/guestinit/kvstore"
)

// modeKV is guest.mode=kv: the key-value service of package kvstore.
const modeKV = "kv"

// serveKV configures the interface as serve does, opens the key-value
// store on the disk (formatting it if it holds no log) and serves it on the
// port until a client asks POWEROFF. It never returns otherwise: the
// machine is snapshotted, restored, failed over or killed while it serves.
// Meanwhile the console echoes lines (echoForever), so a test can check it
// at any moment of the service's life.
func serveKV(out io.Writer, c config) error {
	go func() {
		if err := echoForever(out, c.console); err != nil {
			fmt.Fprintf(out, "%secho: %v\n", prefix, err)
		}
	}()
	if err := boot.WaitDevice(c.disk, c.timeout); err != nil {
		return fmt.Errorf("no disk: %w", err)
	}
	ln, err := listen(c)
	if err != nil {
		return err
	}
	return runKV(out, c.disk, ln, c.iface)
}

// runKV serves the store on disk on ln: the part of serveKV that runs on
// any host (the tests run it on a file and the loopback interface).
func runKV(out io.Writer, disk string, ln net.Listener, iface string) error {
	defer ln.Close()
	st, err := kvstore.Open(disk)
	if err != nil {
		return fmt.Errorf("kv: %w", err)
	}
	defer st.Close()
	i := st.Info()
	how := "recovered"
	if i.Formatted {
		how = "formatted"
	}
	fmt.Fprintf(out, "%skv: log on %s %s: records=%d keys=%d capacity=%d block=%d direct=%t\n", prefix, disk, how, i.Records, i.Keys, i.Capacity, i.Block, i.Direct)
	var mu sync.Mutex // connections log from their own goroutines
	srv := kvstore.NewServer(st, func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(out, prefix+"kv: "+format+"\n", args...)
	})
	fmt.Fprintf(out, "%skv: serving on %s (%s) instance=%s\n", prefix, ln.Addr(), iface, srv.Instance())
	err = srv.Serve(ln)
	if !errors.Is(err, kvstore.ErrPowerOff) {
		return fmt.Errorf("kv: %v", err)
	}
	keys, records := st.Count()
	if err := st.Sync(); err != nil {
		return fmt.Errorf("kv: %w", err)
	}
	fmt.Fprintf(out, "%skv: powering off on request: records=%d keys=%d\n", prefix, records, keys)
	return nil
}
