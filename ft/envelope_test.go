package ft

import (
	"bytes"
	"errors"
	"reflect"
	"testing"

	"github.com/understudy-vmm/understudy/vmm"
)

func TestStateEnvelope(t *testing.T) {
	held := []vmm.Record{{CPU: 0, Value: 7}, {CPU: 1, Value: 8}}
	b := sealState([]byte("machine"), held)
	m, h, err := openState(b)
	if err != nil || string(m) != "machine" || !reflect.DeepEqual(h, held) {
		t.Fatalf("openState(sealState()) = %q, %v, %v", m, h, err)
	}
	if _, h, err := openState(sealState(nil, nil)); err != nil || len(h) != 0 {
		t.Errorf("empty envelope: %v, %v", h, err)
	}
	for i := 0; i < len(b); i++ {
		if _, _, err := openState(b[:i]); !errors.Is(err, ErrBadCheckpoint) {
			t.Errorf("openState(truncated to %d) = %v, want ErrBadCheckpoint", i, err)
		}
	}
	if _, _, err := openState(append(bytes.Clone(b), 0)); err == nil {
		t.Errorf("openState with a trailing byte succeeded")
	}
	if _, _, err := openState(sealState(nil, []vmm.Record{{CPU: 999}})); err == nil {
		t.Errorf("openState with a record from vCPU 999 succeeded")
	}
}

func FuzzOpenState(f *testing.F) {
	f.Add(sealState([]byte("m"), []vmm.Record{{Value: 1}}))
	f.Add([]byte(envelopeMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, h, err := openState(b)
		if err != nil {
			return
		}
		if !bytes.Equal(sealState(m, h), b) {
			t.Errorf("openState(%x) does not re-seal to its input", b)
		}
	})
}
