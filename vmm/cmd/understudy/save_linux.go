package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/understudy-vmm/understudy/vmm"
)

// `understudy run --kernel ... --save FILE`: a Linux guest is saved when a
// signal arrives (--save-on-signal, SIGUSR1 by default) and/or once its
// console has printed a marker (--save-after-output), whichever comes
// first. The machine pauses (its virtio devices complete what the guest
// gave them), the snapshot is written atomically (saveSnapshotFile, which
// flushes the disks first), and the run ends with exit 0.

// saveTrigger is when a Linux guest's --save happens.
type saveTrigger struct {
	sig    os.Signal // nil: no signal
	marker string    // "": no console marker
	// why is what triggered the save, set once.
	why     string
	whyOnce sync.Once
}

// saveSignals are the signals --save-on-signal accepts.
var saveSignals = map[string]syscall.Signal{"USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2, "HUP": syscall.SIGHUP}

// saveTrigger checks the save flags of a Linux run: nil if --save is not
// given.
func (lf *linuxFlags) saveTrigger(set map[string]bool, save string) (*saveTrigger, error) {
	if save == "" {
		if set["save-on-signal"] || set["save-after-output"] {
			return nil, errors.New("--save-on-signal and --save-after-output need --save FILE")
		}
		return nil, nil
	}
	tr := &saveTrigger{marker: lf.saveOutput}
	if set["save-after-output"] && lf.saveOutput == "" {
		return nil, errors.New("--save-after-output needs a non-empty text")
	}
	name := lf.saveSignal
	if !set["save-on-signal"] && lf.saveOutput == "" {
		name = "USR1"
	}
	if set["save-on-signal"] || name != "" {
		sig, ok := saveSignals[strings.TrimPrefix(strings.ToUpper(name), "SIG")]
		if !ok {
			return nil, fmt.Errorf("--save-on-signal %q: want USR1, USR2 or HUP", name)
		}
		tr.sig = sig
	}
	return tr, nil
}

// watchSignal closes saveReq when the trigger's signal arrives (at most
// once, and not after the marker did). The returned function stops
// watching.
func (tr *saveTrigger) watchSignal(saveReq chan struct{}) func() {
	if tr.sig == nil {
		return func() {}
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, tr.sig)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-ch:
			tr.trigger("signal "+sigName(tr.sig), saveReq)
		case <-stop:
		}
	}()
	return func() {
		signal.Stop(ch)
		close(stop)
		<-done
	}
}

// trigger records why and closes saveReq, the first time only.
func (tr *saveTrigger) trigger(why string, saveReq chan struct{}) {
	tr.whyOnce.Do(func() {
		tr.why = why
		close(saveReq)
	})
}

func (tr *saveTrigger) reason() string { return "on " + tr.why }

func sigName(s os.Signal) string {
	for n, v := range saveSignals {
		if v == s {
			return "SIG" + n
		}
	}
	return s.String()
}

// checkSaveDir checks that the directory to save the snapshot into exists.
func checkSaveDir(path string) error {
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || !fi.IsDir() {
		return fmt.Errorf("--save %s: no directory %s to save into", path, filepath.Dir(path))
	}
	return nil
}

// markerWriter passes the guest's console output on and calls found once
// the marker has gone by (it may span writes).
type markerWriter struct {
	w      io.Writer
	marker []byte
	found  func()
	tail   []byte // the last len(marker)-1 bytes seen
	done   bool
}

func (m *markerWriter) Write(p []byte) (int, error) {
	n, err := m.w.Write(p)
	if !m.done {
		buf := append(m.tail, p...)
		if bytes.Contains(buf, m.marker) {
			m.done = true
			m.found()
		}
		keep := min(len(buf), len(m.marker)-1)
		m.tail = append(m.tail[:0:0], buf[len(buf)-keep:]...)
	}
	return n, err
}

// savedSnapshot is what a save did: the file's size, the machine state's
// share of it, how long the pause took (the vCPUs stopping and the devices
// completing their requests) and how long writing the file took.
type savedSnapshot struct {
	size, state  int64
	pause, write time.Duration
}

func (s savedSnapshot) String() string {
	return fmt.Sprintf("%.1f MiB, state %d KiB; paused in %.1f ms, written in %d ms",
		float64(s.size)/(1<<20), (s.state+1023)>>10, float64(s.pause)/float64(time.Millisecond), s.write.Milliseconds())
}

// lineEnds passes a guest's console output on to w and, once the guest has
// stopped, ends the line it left unfinished with a newline on stderr
// (finish), so that understudy's own last line starts a line of its own on
// a terminal or a log that shows both, while stdout keeps the guest's bytes
// exactly (a save triggered by --save-after-output stops the guest before
// it writes the rest of the marker's line).
type lineEnds struct {
	w, stderr io.Writer
	mid       atomic.Bool // the last byte written was not a newline
}

func (l *lineEnds) Write(p []byte) (int, error) {
	n, err := l.w.Write(p)
	if n > 0 {
		l.mid.Store(p[n-1] != '\n')
	}
	return n, err
}

// finish writes a newline to stderr if the output stopped mid-line; the
// guest must no longer run.
func (l *lineEnds) finish() {
	if l.mid.Swap(false) {
		l.stderr.Write([]byte{'\n'})
	}
}

// runLinuxAndSave runs m until saveReq is closed, then pauses it, saves a
// snapshot to path and stops it (beforeSave, if not nil, runs before the
// pause). saved is false if the guest ended first.
func runLinuxAndSave(ctx context.Context, m *vmm.Machine, saveReq <-chan struct{}, path string, beforeSave func()) (res vmm.Result, saved bool, s savedSnapshot, err error) {
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
		return o.res, false, s, o.err
	case <-saveReq:
	}
	if beforeSave != nil {
		beforeSave()
	}
	if s.pause, err = m.Pause(); err != nil {
		o := <-done
		if o.err != nil {
			return o.res, false, s, o.err
		}
		return o.res, false, s, fmt.Errorf("pause to save a snapshot: %w", err)
	}
	began := time.Now()
	size, saveErr := saveSnapshotFile(path, m)
	s.write = time.Since(began)
	s.size, s.state = size, vmm.SnapshotStateSize(size, m.Memory().Size())
	m.Stop(0)
	o := <-done
	if saveErr != nil {
		return o.res, false, s, saveErr
	}
	if o.err != nil {
		return o.res, false, s, o.err
	}
	return o.res, true, s, nil
}
