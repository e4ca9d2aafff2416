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

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/option"
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
	fs := newFlags("restore", "restore --snapshot FILE [--records FILE|-] [--quiet]\n   or: understudy restore --snapshot FILE [--disk PATH[,ro]...] [--net tap=NAME...] (a Linux guest)", stderr)
	snapshot := fs.String("snapshot", "", "snapshot file written by `understudy run --save`")
	records := fs.String("records", "", "write the output records the restored guest emits to this file, one decimal value per line (\"-\": stdout)")
	backing := fs.String("backing", "anon", "guest memory backing: anon or memfd")
	kvmDev := fs.String("kvm", "/dev/kvm", "KVM device")
	quiet := fs.Bool("quiet", false, "do not print the summary line on stderr")
	var disks diskList
	var nets netList
	fs.Var(&disks, "disk", "a Linux guest's virtio-blk disk, given again in the order of the run: PATH[,ro] (the same size and content as at the snapshot; repeatable)")
	fs.Var(&nets, "net", "a Linux guest's virtio-net interface on a tap of this host, in the order of the run: tap=NAME (the MAC is the snapshot's; repeatable)")
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
	began := time.Now()
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
	st, image, err := vmm.ReadSnapshot(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		if errors.Is(err, vmm.ErrBadSnapshot) || errors.Is(err, vmm.ErrBadState) {
			return fail(stderr, fmt.Errorf("%s: %w", *snapshot, err))
		}
		return fail(stderr, err)
	}
	if st.Devices.UART != nil {
		if *records != "" {
			return usageError(fs, "--records applies to payload guests; this snapshot is of a Linux guest")
		}
		return restoreLinux(ctx, cfg, st, image, disks, nets, *quiet, stderr, restoreFrom{*snapshot, f, began})
	}
	if len(disks)+len(nets) > 0 {
		return usageError(fs, "--disk and --net apply to Linux guests; this snapshot is of a payload guest")
	}
	m, err := vmm.Restore(cfg, st, image)
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

// restoreFrom is the snapshot file a restore reads and when it began.
type restoreFrom struct {
	path  string
	f     *os.File
	began time.Time
}

// restoredLine is how the line a Linux guest's restore prints once the
// machine is restored, just before it runs, begins (the appliance's
// understudy.stdin= waits for it).
const restoredLine = boot.RestoredLine

// restoreLinux restores and runs a Linux guest's snapshot with its disks
// and taps given again; it ends as `run --kernel` does. Unless quiet, it
// prints restoredLine with the restore's figures before the guest runs.
func restoreLinux(ctx context.Context, cfg vmm.RestoreConfig, st *vmm.MachineState, image io.Reader, disks diskList, nets netList, quiet bool, stderr io.Writer, from restoreFrom) int {
	cfg.OnRecord, cfg.Disks, cfg.Nets = nil, disks, nets
	ends := &lineEnds{w: cfg.Console, stderr: stderr}
	defer ends.finish()
	cfg.Console = ends
	runCtx, quit := context.WithCancelCause(ctx)
	defer quit(nil)
	in, restoreTTY, err := linuxConsole(linuxStdin, func() { quit(errQuitKey) })
	if err != nil {
		return fail(stderr, err)
	}
	defer restoreTTY()
	cfg.ConsoleIn = in
	m, err := vmm.Restore(cfg, st, image)
	if err != nil {
		restoreTTY()
		return fail(stderr, err)
	}
	defer m.Close()
	if !quiet {
		took := time.Since(from.began)
		state := "?"
		if fi, err := from.f.Stat(); err == nil {
			state = strconv.FormatInt((vmm.SnapshotStateSize(fi.Size(), st.Config.MemSize)+1023)>>10, 10)
		}
		fmt.Fprintf(stderr, "%s%s in %d ms (%s of memory, state %s KiB, %d disks, %d nets); the guest runs\n",
			restoredLine, from.path, took.Milliseconds(), option.FormatSize(st.Config.MemSize), state, len(disks), len(nets))
	}
	start := time.Now()
	res, err := m.Run(runCtx)
	restoreTTY()
	ends.finish()
	elapsed := time.Since(start).Round(time.Millisecond)
	switch {
	case errors.Is(context.Cause(runCtx), errQuitKey) && ctx.Err() == nil:
		fmt.Fprintf(stderr, "understudy: quit (Ctrl-A x) after %v\n", elapsed)
		return exitInterrupted
	case errors.Is(err, context.Canceled):
		fmt.Fprintf(stderr, "understudy: interrupted after %v\n", elapsed)
		return exitInterrupted
	case err != nil:
		return fail(stderr, err)
	}
	return linuxEnd(res, elapsed, quiet, stderr)
}
