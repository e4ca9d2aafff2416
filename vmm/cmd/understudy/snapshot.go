package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/vmm"
)

// runAndSave runs m until saveReq is closed (by the OnRecord callback that
// also requested the pause), then completes the pause, saves a snapshot to
// path and stops the machine. saved is false if the guest ended first.
func runAndSave(ctx context.Context, m *vmm.Machine, saveReq <-chan struct{}, path string, stderr io.Writer) (res vmm.Result, saved bool, err error) {
	type outcome struct {
		res vmm.Result
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		r, err := m.Run(ctx)
		done <- outcome{r, err}
	}()
	select {
	case o := <-done:
		return o.res, false, o.err
	case <-saveReq:
	}
	if _, err := m.Pause(); err != nil {
		o := <-done
		if o.err != nil {
			return o.res, false, o.err
		}
		return o.res, false, fmt.Errorf("pause to save a snapshot: %w", err)
	}
	size, saveErr := saveSnapshotFile(path, m)
	m.Stop(0)
	o := <-done
	if saveErr != nil {
		return o.res, false, saveErr
	}
	if o.err != nil {
		return o.res, false, o.err
	}
	fmt.Fprintf(stderr, "understudy: saved a snapshot after %d output records to %s (%.1f MiB)\n", o.res.Records, path, float64(size)/(1<<20))
	return o.res, true, nil
}

// saveSnapshotFile writes a snapshot of the paused machine m to path
// atomically: to path.tmp, synced, then renamed over path. It returns the
// file's size.
func saveSnapshotFile(path string, m *vmm.Machine) (size int64, err error) {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	if err := m.SaveSnapshot(w); err != nil {
		return 0, fmt.Errorf("save snapshot to %s: %w", path, err)
	}
	if err := w.Flush(); err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	if err := f.Sync(); err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	if err := f.Close(); err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, fmt.Errorf("save snapshot: %w", err)
	}
	// Make the rename itself durable.
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return fi.Size(), nil
}

func cmdRestore(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("restore", "restore --snapshot FILE [--records FILE|-] [--quiet]", stderr)
	snapshot := fs.String("snapshot", "", "snapshot file written by `understudy run --save`")
	records := fs.String("records", "", "write the output records the restored guest emits to this file, one decimal value per line (\"-\": stdout)")
	backing := fs.String("backing", "anon", "guest memory backing: anon or memfd")
	kvmDev := fs.String("kvm", "/dev/kvm", "KVM device")
	quiet := fs.Bool("quiet", false, "do not print the summary line on stderr")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *snapshot == "" {
		return usageError(fs, "--snapshot is required")
	}
	bk, err := parseBacking(*backing)
	if err != nil {
		return fail(stderr, err)
	}
	f, err := os.Open(*snapshot)
	if err != nil {
		return fail(stderr, err)
	}
	defer f.Close()
	recW, closeRecords, err := openRecords(*records, stdout)
	if err != nil {
		return fail(stderr, err)
	}
	defer closeRecords()

	var emitted atomic.Uint64
	cfg := vmm.RestoreConfig{
		KVMDevice: *kvmDev, Backing: bk, Console: stdout,
		OnRecord: func(r vmm.Record) {
			emitted.Add(1)
			if recW != nil {
				recW.WriteString(strconv.FormatUint(r.Value, 10) + "\n")
			}
		},
	}
	m, err := vmm.RestoreSnapshot(cfg, bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		if errors.Is(err, vmm.ErrBadSnapshot) || errors.Is(err, vmm.ErrBadState) {
			return fail(stderr, fmt.Errorf("%s: %w", *snapshot, err))
		}
		return fail(stderr, err)
	}
	defer m.Close()
	start := time.Now()
	res, err := m.Run(ctx)
	elapsed := time.Since(start)
	if code, done := runFailed(res, err, elapsed, stderr); done {
		return code
	}
	if !*quiet {
		fmt.Fprintf(stderr, "understudy: guest exited with code %d after %v (%d output records, %d since the snapshot)\n", res.ExitCode, elapsed.Round(time.Millisecond), res.Records, emitted.Load())
	}
	return guestExitCode(res)
}
