package virtio

import (
	"encoding/binary"
	"sync"
	"testing"
)

func TestFeatureNegotiation(t *testing.T) {
	d, _ := newBlockDriver(t, newDisk(t), false)
	offered := d.deviceFeatures()
	if offered&FeatureVersion1 == 0 {
		t.Fatalf("device features %#x lack VIRTIO_F_VERSION_1", offered)
	}
	tests := []struct {
		name     string
		features uint64
		ok       bool
	}{
		{"all offered", offered, true},
		{"only VERSION_1", FeatureVersion1, true},
		{"legacy driver without VERSION_1", offered &^ FeatureVersion1, false},
		{"unoffered low feature", offered | 1<<0, false},
		{"unoffered high feature", offered | 1<<40, false},
	}
	for _, tt := range tests {
		st := d.negotiate(tt.features)
		if got := st&StatusFeaturesOK != 0; got != tt.ok {
			t.Errorf("%s: FEATURES_OK accepted = %v (status %#x), want %v", tt.name, got, st, tt.ok)
		}
		if !tt.ok {
			if err := d.write(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK); err == nil {
				t.Errorf("%s: DRIVER_OK without FEATURES_OK accepted", tt.name)
			}
			if st := d.status(); st&StatusDriverOK != 0 {
				t.Errorf("%s: status %#x has DRIVER_OK without FEATURES_OK", tt.name, st)
			}
		}
	}
	// A feature above bit 63 was not offered either.
	d.mustWrite(regStatus, 0)
	d.mustWrite(regStatus, StatusAcknowledge|StatusDriver)
	d.mustWrite(regDriverFeaturesSel, 1)
	d.mustWrite(regDriverFeatures, 1)
	d.mustWrite(regDriverFeaturesSel, 2)
	wantErr(t, "DriverFeatures word 2", d.write(regDriverFeatures, 1), ErrBadAccess)
	wantErr(t, "FEATURES_OK with a feature above bit 63", d.write(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK), ErrBadAccess)
	if st := d.status(); st&StatusFeaturesOK != 0 {
		t.Errorf("status %#x: FEATURES_OK accepted with a feature above bit 63", st)
	}

	// Features cannot change after FEATURES_OK.
	d.negotiate(FeatureVersion1)
	d.mustWrite(regDriverFeaturesSel, 0)
	wantErr(t, "DriverFeatures after FEATURES_OK", d.write(regDriverFeatures, 0xffffffff), ErrBadAccess)
	if got := d.tr.State().DriverFeatures; got != FeatureVersion1 {
		t.Errorf("driver features = %#x, want %#x", got, uint64(FeatureVersion1))
	}
}

func TestResetClearsState(t *testing.T) {
	d, _ := newBlockDriver(t, newDisk(t), false)
	d.submit(0, d.chain(buf{data: blkHeader(BlockTIn, 0)}, buf{n: 512, write: true}, buf{n: 1, write: true}))
	if err := d.notify(0); err != nil {
		t.Fatal(err)
	}
	if st := d.tr.State(); st.Queues[0].LastAvail != 1 || st.Queues[0].UsedIdx != 1 || !st.Queues[0].Ready {
		t.Fatalf("queue state after one request = %+v", st.Queues[0])
	}
	d.mustWrite(regStatus, 0)
	st := d.tr.State()
	if st.Status != 0 || st.DriverFeatures != 0 || st.InterruptStatus != 0 || st.Queues[0] != (QueueState{}) {
		t.Errorf("state after reset = %+v, want zero", st)
	}
	d.mustWrite(regQueueSel, 0)
	if d.read(regQueueReady) != 0 {
		t.Errorf("queue ready after reset")
	}
	wantErr(t, "notify after reset", d.notify(0), ErrBadAccess)
}

func TestQueueSetupValidation(t *testing.T) {
	tests := []struct {
		name              string
		size              uint32
		desc, avail, used uint64
	}{
		{"size zero", 0, 0x10000, 0x11000, 0x12000},
		{"size not a power of 2", 100, 0x10000, 0x11000, 0x12000},
		{"size above max", 512, 0x10000, 0x11000, 0x12000},
		{"size above 16 bits", 1 << 16, 0x10000, 0x11000, 0x12000},
		{"unaligned descriptor table", 256, 0x10008, 0x11000, 0x12000},
		{"unaligned used ring", 256, 0x10000, 0x11000, 0x12002},
		{"descriptor table past memory", 256, testMemory - 0x800, 0x11000, 0x12000},
		{"available ring outside memory", 256, 0x10000, 0xd0000000, 0x12000},
		{"used ring above 4 GiB", 256, 0x10000, 0x11000, 1<<32 | 0x12000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, _ := newBlockDriver(t, newDisk(t), false)
			d.mustWrite(regStatus, 0)
			d.negotiate(d.deviceFeatures())
			d.mustWrite(regQueueSel, 0)
			d.mustWrite(regQueueNum, tt.size)
			d.mustWrite(regQueueDescLow, uint32(tt.desc))
			d.mustWrite(regQueueDescHigh, uint32(tt.desc>>32))
			d.mustWrite(regQueueDriverLow, uint32(tt.avail))
			d.mustWrite(regQueueDriverHigh, uint32(tt.avail>>32))
			d.mustWrite(regQueueDeviceLow, uint32(tt.used))
			d.mustWrite(regQueueDeviceHigh, uint32(tt.used>>32))
			wantErr(t, "QueueReady=1", d.write(regQueueReady, 1), ErrMalformed)
			if d.read(regQueueReady) != 0 {
				t.Errorf("queue is ready")
			}
			if s := d.status(); s&StatusDeviceNeedsReset == 0 {
				t.Errorf("status = %#x, want DEVICE_NEEDS_RESET", s)
			}
		})
	}
}

func TestRegisterAccessRules(t *testing.T) {
	d, _ := newBlockDriver(t, newDisk(t), false)
	var two [2]byte
	wantErr(t, "2-byte register read", d.tr.Read(regStatus, two[:]), ErrBadAccess)
	wantErr(t, "2-byte register write", d.tr.Write(regStatus, two[:]), ErrBadAccess)
	wantErr(t, "unaligned register read", d.tr.Read(regStatus+1, make([]byte, 4)), ErrBadAccess)
	wantErr(t, "read past the window", d.tr.Read(MMIOSize-2, make([]byte, 4)), ErrBadAccess)
	wantErr(t, "write of MagicValue", d.write(regMagicValue, 0), ErrBadAccess)
	wantErr(t, "read of QueueNotify", d.tr.Read(regQueueNotify, make([]byte, 4)), ErrBadAccess)
	wantErr(t, "notify of a missing queue", d.notify(5), ErrBadAccess)
	wantErr(t, "QueueNum while ready", d.write(regQueueNum, 16), ErrBadAccess)
	wantErr(t, "driver sets NEEDS_RESET", d.write(regStatus, d.status()|StatusDeviceNeedsReset), ErrBadAccess)
	wantErr(t, "driver clears a status bit", d.write(regStatus, StatusAcknowledge), ErrBadAccess)
	if got := d.read(regMagicValue); got != MagicValue {
		t.Errorf("MagicValue = %#x after a write", got)
	}
	if s := d.status(); s != StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK {
		t.Errorf("status = %#x after refused writes", s)
	}
	d.mustWrite(regQueueSel, 7)
	if got := d.read(regQueueNumMax); got != 0 {
		t.Errorf("QueueNumMax of a missing queue = %d, want 0", got)
	}
	if got := d.read(regSHMLenLow); got != 0xffffffff {
		t.Errorf("SHMLenLow = %#x, want all ones (no shared memory)", got)
	}
	// The device still works.
	d.mustWrite(regQueueSel, 0)
	ds := d.chain(buf{data: blkHeader(BlockTIn, 2)}, buf{n: 512, write: true}, buf{n: 1, write: true})
	if _, st, err := d.request(ds); err != nil || st != BlockSOK {
		t.Errorf("request after refused accesses: status %d err %v", st, err)
	}
}

// Several vCPUs hit the transport at once (run with -race).
func TestConcurrentAccess(t *testing.T) {
	d, _ := newBlockDriver(t, newDisk(t), false)
	const requests = 64
	for i := range requests {
		d.submit(0, d.chain(buf{data: blkHeader(BlockTIn, uint64(i%diskSectors))}, buf{n: 512, write: true}, buf{n: 1, write: true}))
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b [4]byte
			for range 200 {
				if err := d.tr.Read(regInterruptStatus, b[:]); err != nil {
					t.Error(err)
					return
				}
				binary.LittleEndian.PutUint32(b[:], 0)
				if err := d.tr.Write(regQueueNotify, b[:]); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if used := d.takeUsed(0); len(used) != requests {
		t.Fatalf("%d used entries, want %d", len(used), requests)
	}
}
