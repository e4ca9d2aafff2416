package qemutests

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/appliance"
	"github.com/understudy-vmm/understudy/initramfs/boot"
)

// TestGuestInitramfs boots the nested guests' kernel and initramfs
// (build/image/guest.cpio) straight under QEMU, with QEMU's own virtio-pci
// devices, to check the guest side on its own: guestinit's three modes
// work, whatever the state of understudy's Linux boot.
func TestGuestInitramfs(t *testing.T) {
	e := setup(t)
	// QEMU only emulates the CPU here: no nesting is needed.
	accel := e.accel
	if accel.Name == "tcg" {
		accel.Args = []string{"-accel", "tcg", "-cpu", "qemu64"}
	}
	start := func(t *testing.T, guest string, network, extra []string) *Machine {
		log := filepath.Join(t.TempDir(), "console.log")
		m, err := Start(Config{
			Kernel: filepath.Join(e.image, appliance.ImageKernel), Initrd: filepath.Join(e.image, appliance.ImageGuest),
			Append: "console=ttyS0 panic=-1 quiet " + guest, MemMiB: 256, Accel: accel,
			Network: network, Extra: extra, LogPath: log, Deadline: testDeadline(t),
			OnLine: func(l Line) { t.Logf("console %6.2fs| %s", l.At.Seconds(), l.Text) },
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Kill(); keepLog(t, e, log) })
		return m
	}
	t.Run("poweroff", func(t *testing.T) {
		m := start(t, "guest.mode=poweroff", nil, nil)
		expect(t, m, bootTimeout, "understudy-guest: init reached", "understudy-guest: mode poweroff", "understudy-guest: done, powering off")
		if err := m.Wait(exitTimeout); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("disk", func(t *testing.T) {
		img := filepath.Join(t.TempDir(), "disk.img")
		b := make([]byte, boot.TestDiskSize)
		want := []string{"understudy-guest: module virtio_blk: loaded"}
		for _, off := range boot.TestDiskOffsets {
			text := fmt.Sprintf("guest-disk-%d", off)
			copy(b[off:], text+"\n")
			want = append(want, fmt.Sprintf(`understudy-guest: disk /dev/vda offset %d: %q`, off, text))
		}
		if err := os.WriteFile(img, b, 0o644); err != nil {
			t.Fatal(err)
		}
		m := start(t, "guest.mode=disk", nil, []string{"-drive", "file=" + img + ",if=virtio,format=raw,readonly=on"})
		expect(t, m, bootTimeout, append(want, "understudy-guest: done, powering off")...)
		if err := m.Wait(exitTimeout); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("net", func(t *testing.T) {
		// QEMU's user network, restricted (the guest reaches nothing), with
		// one port forwarded from the host's loopback to the guest.
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		network := []string{
			"-netdev", fmt.Sprintf("user,id=n0,restrict=on,net=192.0.2.0/24,host=192.0.2.1,hostfwd=tcp:127.0.0.1:%d-%s:%s", port, guestAddr, guestPort),
			"-device", "virtio-net-pci,netdev=n0",
		}
		m := start(t, "guest.mode=net guest.addr="+guestAddr+"/24 guest.port="+guestPort, network, nil)
		expect(t, m, bootTimeout, "understudy-guest: listening on "+guestAddr+":"+guestPort+" (eth0)")
		// QEMU accepts forwarded connections before the guest listens and
		// closes them empty; the answer comes once it does.
		var got string
		deadline := time.Now().Add(nestedTimeout)
		for got == "" && time.Now().Before(deadline) && !m.Exited() {
			conn, err := net.DialTimeout("tcp4", "127.0.0.1:"+strconv.Itoa(port), time.Second)
			if err == nil {
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				b, _ := io.ReadAll(conn)
				conn.Close()
				got = string(b)
			}
			if got == "" {
				time.Sleep(200 * time.Millisecond)
			}
		}
		if strings.TrimSpace(got) != guestAnswer {
			t.Fatalf("the guest answered %q, want %q", got, guestAnswer)
		}
		if _, err := m.WaitFor(context.Background(), "understudy-guest: done, powering off", exitTimeout); err != nil {
			t.Fatal(err)
		}
		if err := m.Wait(exitTimeout); err != nil {
			t.Fatal(err)
		}
	})
}
