package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"time"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// The fault-tolerance roles: `run --protect` (primary), `intermediary` and
// `backup`. Links are mutual TLS with the certificates of `understudy keys`.

// roleFlags are the flags every role shares.
type roleFlags struct {
	keys, name *string
	verbose    *bool
}

func addRoleFlags(fs interface {
	String(name, value, usage string) *string
	Bool(name string, value bool, usage string) *bool
}, role string) roleFlags {
	return roleFlags{
		keys:    fs.String("keys", "", "directory with the cluster CA and this node's key and certificate (understudy keys)"),
		name:    fs.String("name", role, "this node's name (its certificate files are NAME.crt and NAME.key)"),
		verbose: fs.Bool("verbose", false, "log link events on stderr"),
	}
}

func (r roleFlags) config(role wire.Role, memSize uint64, stderr io.Writer) (*transport.Config, error) {
	if *r.keys == "" {
		return nil, fmt.Errorf("--keys DIR is required (make one with `understudy keys init` and `understudy keys issue`)")
	}
	creds, err := transport.LoadCredentials(*r.keys, *r.name)
	if err != nil {
		return nil, err
	}
	level := slog.LevelWarn
	if *r.verbose {
		level = slog.LevelInfo
	}
	return &transport.Config{Credentials: creds, Hello: wire.Hello{Role: role, MemSize: memSize},
		Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))}, nil
}

// runProtected runs machine m as a primary protected through the
// intermediary at addr. Records reach release only after the intermediary
// acknowledged the checkpoint covering them.
func runProtected(ctx context.Context, m *vmm.Machine, route *func(vmm.Record), addr string, tcfg *transport.Config,
	interval time.Duration, release func(vmm.Record), stderr io.Writer) (vmm.Result, error) {
	tcfg.PeerRoles = []wire.Role{wire.RoleIntermediary}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := transport.Dial(dctx, addr, tcfg)
	cancel()
	if err != nil {
		return vmm.Result{}, err
	}
	defer conn.Close()
	p, err := ft.NewPrimary(m, conn, ft.PrimaryConfig{Interval: interval, OnRelease: release})
	if err != nil {
		return vmm.Result{}, err
	}
	*route = p.Record
	type runResult struct {
		res vmm.Result
		err error
	}
	ran := make(chan runResult, 1)
	go func() {
		res, err := m.Run(ctx)
		p.Halted()
		ran <- runResult{res, err}
	}()
	stopStatus := everyInterval(time.Second, func() {
		fmt.Fprintf(stderr, "understudy: primary: epochs=%d acked=%d\n", p.Epochs(), p.Acked())
	})
	perr := p.Run(ctx)
	stopStatus()
	if perr != nil {
		m.Stop(0)
	}
	r := <-ran
	if perr != nil && !errors.Is(perr, context.Canceled) {
		return r.res, fmt.Errorf("protection failed: %w", perr)
	}
	fmt.Fprintf(stderr, "understudy: primary: %d checkpoints, all output released up to epoch %d\n", p.Epochs(), p.Acked())
	return r.res, r.err
}

// everyInterval calls fn every d until the returned function is called.
func everyInterval(d time.Duration, fn func()) func() {
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fn()
			}
		}
	}()
	return func() { close(done); <-finished }
}

func cmdIntermediary(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("intermediary", "intermediary --listen ADDR --backup ADDR --keys DIR [--name NAME]", stderr)
	listen := fs.String("listen", "tcp://127.0.0.1:7401", "address the primary connects to (tcp://host:port or vsock://cid:port)")
	backupAddr := fs.String("backup", "", "address of the backup")
	rf := addRoleFlags(fs, "intermediary")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *backupAddr == "" {
		fmt.Fprintln(stderr, "understudy intermediary: --backup ADDR is required")
		return exitUsage
	}
	tcfg, err := rf.config(wire.RoleIntermediary, 0, stderr)
	if err != nil {
		return fail(stderr, err)
	}
	tcfg.PeerRoles = []wire.Role{wire.RolePrimary}
	ln, err := transport.Listen(*listen, tcfg)
	if err != nil {
		return fail(stderr, err)
	}
	defer ln.Close()
	fmt.Fprintf(stderr, "understudy: intermediary listening on %s\n", ln.Addr())
	pc, err := ln.Accept(ctx)
	if err != nil {
		return fail(stderr, err)
	}
	memSize := pc.Peer().Hello.MemSize
	fmt.Fprintf(stderr, "understudy: intermediary: primary %q connected (guest memory %s)\n", pc.Peer().Name, vmm.FormatSize(memSize))
	in, err := ft.NewIntermediary(memSize, tcfg.Logger)
	if err != nil {
		return fail(stderr, err)
	}
	bcfg := *tcfg
	bcfg.PeerRoles = []wire.Role{wire.RoleBackup}
	bcfg.Hello.MemSize = memSize
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	bc, err := transport.Dial(dctx, *backupAddr, &bcfg)
	cancel()
	if err != nil {
		return fail(stderr, fmt.Errorf("backup: %w", err))
	}
	defer bc.Close()
	go in.ServeBackup(ctx, bc)
	stopStatus := everyInterval(time.Second, func() {
		fmt.Fprintf(stderr, "understudy: intermediary: epoch=%d\n", in.Image().Epoch())
	})
	perr := in.ServePrimary(pc)
	stopStatus()
	if perr == nil {
		fmt.Fprintf(stderr, "understudy: intermediary: primary finished at epoch %d\n", in.Image().Epoch())
		_ = bc.WriteMessage(&wire.Bye{Reason: "primary finished"})
		return 0
	}
	fmt.Fprintf(stderr, "understudy: intermediary: primary lost at epoch %d (%v): failing over\n", in.Image().Epoch(), perr)
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	epoch, err := in.Failover(fctx)
	if err != nil {
		return fail(stderr, fmt.Errorf("failover: %w", err))
	}
	fmt.Fprintf(stderr, "understudy: intermediary: backup activated at epoch %d\n", epoch)
	return 0
}

func cmdBackup(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("backup", "backup --listen ADDR --keys DIR [--name NAME] [--records FILE]", stderr)
	listen := fs.String("listen", "tcp://127.0.0.1:7402", "address the intermediary connects to")
	records := fs.String("records", "", "after activation, write the guest's output records to this file (\"-\": stdout)")
	rf := addRoleFlags(fs, "backup")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	tcfg, err := rf.config(wire.RoleBackup, 0, stderr)
	if err != nil {
		return fail(stderr, err)
	}
	tcfg.PeerRoles = []wire.Role{wire.RoleIntermediary}
	recW, closeRecords, err := openRecords(*records, stdout)
	if err != nil {
		return fail(stderr, err)
	}
	defer closeRecords()
	ln, err := transport.Listen(*listen, tcfg)
	if err != nil {
		return fail(stderr, err)
	}
	defer ln.Close()
	fmt.Fprintf(stderr, "understudy: backup listening on %s\n", ln.Addr())
	c, err := ln.Accept(ctx)
	if err != nil {
		return fail(stderr, err)
	}
	memSize := c.Peer().Hello.MemSize
	first := true
	rcfg := vmm.RestoreConfig{Console: stdout, OnRecord: func(r vmm.Record) {
		if first {
			fmt.Fprintf(stderr, "understudy: backup: first output record released: %d (the primary's held output first)\n", r.Value)
			first = false
		}
		if recW != nil {
			recW.WriteString(strconv.FormatUint(r.Value, 10) + "\n")
		}
	}}
	b, err := ft.NewBackup(memSize, ft.BackupConfig{Restore: rcfg, Log: tcfg.Logger})
	if err != nil {
		return fail(stderr, err)
	}
	m, err := b.Serve(c)
	if err != nil {
		return fail(stderr, err)
	}
	if m == nil {
		fmt.Fprintf(stderr, "understudy: backup: the intermediary ended the link without activating (last epoch %d): nothing to resume\n", b.Committed())
		return 0
	}
	defer m.Close()
	fmt.Fprintf(stderr, "understudy: backup: activated at epoch %d; resuming the guest\n", b.Committed())
	start := time.Now()
	res, err := m.Run(ctx)
	if code, done := runFailed(res, err, time.Since(start), stderr); done {
		return code
	}
	fmt.Fprintf(stderr, "understudy: backup: guest exited with code %d\n", res.ExitCode)
	return guestExitCode(res)
}
