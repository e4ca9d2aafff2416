# Understudy. Run `make help` for the targets.
GO        ?= go
BIN       := build/understudy
PAYLOADS  := hello counter touch pio fault
PAYLOAD_SRC := vmm/payload/src
PAYLOAD_BIN := vmm/payload/bin
export CGO_ENABLED := 0
SHELL     := /bin/bash
.SHELLFLAGS := -o pipefail -ec

IMAGE     := build/image

.PHONY: all build run demo demo-linux test unit-test qemu-test image bench soak soak-linux lint payloads clean help

all: build

help:
	@echo "make demo      primary, intermediary and backup on loopback; kill the primary; the backup resumes"
	@echo "make demo-linux  (root, QEMU) a protected Linux guest on three appliance nodes; kill the primary; its TCP client goes on"
	@echo "make run       build and run the hello payload guest on /dev/kvm"
	@echo "make build     build $(BIN) (static, CGO_ENABLED=0)"
	@echo "make test      lint, unit and host-KVM tests (race detector on the concurrent packages), then qemu-test"
	@echo "make image     build the appliance into $(IMAGE) (Debian kernel, u-root initramfs, nested guest initramfs), and build/image-damon with the 6.12 kernel"
	@echo "make qemu-test boot the appliance under QEMU: uinit report, nested Linux guest, its network and disk, two nodes on one segment (root)"
	@echo "make bench     benchmarks; prints 'bench ...' result lines"
	@echo "make soak      1000 primary kills with the fault-injection harness (internal/chaos)"
	@echo "make soak-linux  (root, QEMU) INJECTIONS (default 30) kills of a protected Linux guest's primary, a TCP client each"
	@echo "make payloads  rebuild the payload binaries from their sources"
	@echo "make lint      gofmt, go vet, staticcheck"

build:
	$(GO) build -trimpath -o $(BIN) ./vmm/cmd/understudy

run: build
	$(BIN) run --payload hello

demo: build
	bash ft/demo.sh $(BIN)

# The Linux demo (QEMU tier, root): three appliance nodes (primary,
# intermediary, backup) and a client node on one segment; the primary's
# QEMU is killed; the client goes on. TestLinuxFailover, step by step.
demo-linux: image
	@if UNDERSTUDY_QEMU_REQUIRED=1 UNDERSTUDY_INJECTIONS=1 $(GO) test -count=1 -v -timeout 14m -run '^TestLinuxFailover$$' ./qemu-tests/ | \
		grep --line-buffered -E 'demo: |client .*kvload: (connected|progress|slow write|result|OK|FAILED)|node[23] .*understudy: (intermediary|backup): (primary lost|backup activated|activated)|^--- (PASS|FAIL)'; \
	then echo "demo-linux: OK"; else echo "demo-linux: FAILED"; exit 1; fi

# Payload binaries are committed; this regenerates them (needs GNU as and objcopy).
payloads: $(PAYLOADS:%=$(PAYLOAD_BIN)/%.bin)

$(PAYLOAD_BIN)/%.bin: $(PAYLOAD_SRC)/%.S $(PAYLOAD_SRC)/abi.inc $(PAYLOAD_SRC)/lib.inc
	@mkdir -p build/payload
	as --64 -I $(PAYLOAD_SRC) -o build/payload/$*.o $<
	objcopy -O binary -j .text build/payload/$*.o $@

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

# The tests: lint, all unit and host-KVM tests, the race detector on the
# packages with goroutines (race needs cgo), then the QEMU tier. The
# fault-injection harness (three processes per injection) runs on its own,
# so that its load does not disturb the timing-sensitive host-KVM tests.
test: unit-test qemu-test

unit-test: lint
	$(GO) test -count=1 $$($(GO) list ./... | grep -v -e /qemu-tests -e /internal/chaos)
	$(GO) test -count=1 -timeout 30m ./internal/chaos/
	CGO_ENABLED=1 $(GO) test -count=1 -race ./vmm/ ./vmm/largepage/ ./vmm/devices/ ./vmm/virtio/ ./mmu/ ./ft/ ./ft/diskrep/ ./ft/transport/ ./ft/wire/ ./ft/wanzip/ ./internal/wan/ ./internal/kvclient/ ./internal/cmd/kvload/ ./initramfs/appliance/ ./initramfs/guestinit/ ./initramfs/guestinit/kvstore/ ./initramfs/cmd/nodefile/

# The appliance (initramfs/): kernel cached in build/cache, image in $(IMAGE).
# A second appliance with Debian's 6.12 kernel (bookworm-backports), which
# has DAMON with virtual-address operations, for the DAMON sampler's test.
image: build
	$(GO) run ./initramfs/cmd/mkimage -understudy $(BIN) -out $(IMAGE) -cache build/cache
	$(GO) run ./initramfs/cmd/mkimage -understudy $(BIN) -out build/image-damon -cache build/cache -suite bookworm-backports

# The QEMU tier: it must not skip here, so a missing image or QEMU fails.
# A failed test keeps its console log in build/qemu-tests/.
# testtail ends the output with each failure's reason and its machines'
# last console lines, so that a log's tail says what failed.
qemu-test: image
	UNDERSTUDY_QEMU_REQUIRED=1 $(GO) test -count=1 -v -timeout 40m ./qemu-tests/ 2>&1 | $(GO) run ./internal/cmd/testtail

# The long fault-injection run: 1000 SIGKILLs of the primary, and 200 more
# with the intermediary holding back hot pages.
soak:
	UNDERSTUDY_INJECTIONS=$${INJECTIONS:-1000} $(GO) test -count=1 -v -timeout 2h -run 'TestPrimaryKill(HoldBack|Manifest|LargePages|DirtyBudget)?$$' ./internal/chaos/ | grep -E '^(soak ft|--- |\s+\S+_test.go)'

# The long Linux run: INJECTIONS (default 30) kills of a protected Linux
# guest's primary under QEMU, each on a fresh four-node cluster (about 100 s
# each under TCG).
soak-linux: image
	UNDERSTUDY_QEMU_REQUIRED=1 UNDERSTUDY_INJECTIONS=$${INJECTIONS:-30} $(GO) test -count=1 -v -timeout 4h -run '^TestLinuxFailover$$' ./qemu-tests/ | grep -E '^(soak linux-ft|\s*--- |\s+linuxft_test.go:[0-9]+: linux failover)'

bench:
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x ./vmm/bench/ ./ft/ ./ft/transport/ ./internal/wan/ ./ft/wanzip/ ./mmu/ | grep -vE '^(Benchmark|goos|goarch|pkg|cpu|PASS)'
	$(GO) test -count=1 -run '^$$' -bench 'LinuxSnapshot|LinuxFailover|LinuxFT|LinuxExitDetect' -benchtime 1x -timeout 30m ./qemu-tests/ 2>&1 | $(GO) run ./internal/cmd/testtail -only '^(bench|KNOWN HANG|--- FAIL|FAIL|ok|panic:)'

clean:
	rm -rf build
