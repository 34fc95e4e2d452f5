package qemu

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/vmm"
)

// TestBootDevices boots a guest that reads /dev/vda (a byte range of a host
// file), echoes a line on the kiln.ctl port and powers off.
func TestBootDevices(t *testing.T) {
	// The disk is the middle of a file: [8192, 12288).
	disk := filepath.Join(t.TempDir(), "disk,ro.img")
	payload := bytes.Repeat([]byte("kiln disk payload\n"), 4096/18+1)[:4096]
	content := append(append(bytes.Repeat([]byte{'x'}, 8192), payload...), bytes.Repeat([]byte{'y'}, 1000)...)
	if err := os.WriteFile(disk, content, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := bootConfig(t, "devices")
	cfg.Ports = []string{"kiln.agent", "kiln.ctl"}
	cfg.Disks = []vmm.Disk{{Path: disk, Offset: 8192, Size: 4096, ReadOnly: true}}
	m := startMachine(t, cfg)
	if m.Port("nope") != nil {
		t.Errorf("Port(%q) = non-nil, want nil", "nope")
	}
	ctl := m.Port("kiln.ctl")
	if ctl == nil {
		t.Fatal("Port(kiln.ctl) = nil")
	}
	if _, err := ctl.Write([]byte("hello host\n")); err != nil {
		t.Fatalf("writing to port: %v", err)
	}
	ctl.SetReadDeadline(time.Now().Add(2 * time.Minute))
	got, err := bufio.NewReader(ctl).ReadString('\n')
	if err != nil {
		t.Fatalf("reading port: %v; console:\n%s", err, m.Console())
	}
	want := fmt.Sprintf("echo hello host disk 4096 %x\n", sha256.Sum256(payload))
	if got != want {
		t.Errorf("guest answered %q, want %q", got, want)
	}
	if err := m.Wait(); err != nil {
		t.Errorf("Wait() = %v, want nil (guest powered off)", err)
	}
	if c := m.Console(); !bytes.Contains(c, []byte("guestinit: mode devices")) {
		t.Errorf("console lacks the guest's greeting:\n%s", c)
	}
}

// TestCloseKillsAndCleansUp checks that Close stops a guest that never
// powers off, closes every fd and reaps QEMU.
func TestCloseKillsAndCleansUp(t *testing.T) {
	cfg := bootConfig(t, "ping")
	cfg.Ports = []string{"kiln.ctl"}
	before := countFDs(t)
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	pid := m.Pid()
	if pid <= 0 {
		t.Fatalf("Pid() = %d, want > 0", pid)
	}
	if got := m.Accel(); got != vmm.TCG && got != vmm.KVM {
		t.Errorf("Accel() = %q", got)
	}
	waitConsole(t, m, "ping")

	// Wait concurrently with Close.
	waited := make(chan error, 1)
	go func() { waited <- m.Wait() }()
	if err := m.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close() = %v", err)
	}
	select {
	case err := <-waited:
		if !errors.Is(err, vmm.ErrClosed) {
			t.Errorf("Wait() = %v, want an error wrapping vmm.ErrClosed", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Wait did not return after Close")
	}
	select {
	case <-m.Done():
	default:
		t.Error("Done() not closed after Close")
	}
	if !processGone(pid) {
		t.Errorf("qemu pid %d still exists after Close", pid)
	}
	if after := countFDs(t); after != before {
		t.Errorf("open fds: %d before New, %d after Close", before, after)
	}
	if err := m.Start(ctx); !errors.Is(err, vmm.ErrClosed) {
		t.Errorf("Start after Close = %v, want vmm.ErrClosed", err)
	}
	if err := m.SaveState(ctx, filepath.Join(t.TempDir(), "state")); !errors.Is(err, vmm.ErrClosed) {
		t.Errorf("SaveState after Close = %v, want vmm.ErrClosed", err)
	}
}

// TestGuestPanic checks that a guest whose init exits (kernel panic, reboot,
// QEMU exits because of -no-reboot) is reported as an error, not a clean
// power-off.
func TestGuestPanic(t *testing.T) {
	m := startMachine(t, bootConfig(t, "panic"))
	err := m.Wait()
	if err == nil || !strings.Contains(err.Error(), "guest rebooted") {
		t.Fatalf("Wait() = %v, want a 'guest rebooted' error", err)
	}
	if !strings.Contains(err.Error(), "Kernel panic") {
		t.Errorf("Wait() = %v, want the console's panic message in it", err)
	}
}

// TestCrash checks QMP errors, state errors, and that a QEMU killed from the
// outside is reported with its signal.
func TestCrash(t *testing.T) {
	m := startMachine(t, bootConfig(t, "ping"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	err := m.qmp.Execute(ctx, "no-such-command", nil, nil)
	var qe *QMPError
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Errorf("Execute(no-such-command) = %v, want a QMPError of class CommandNotFound", err)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := m.qmp.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Errorf("query-status = %q, %v; want running", st.Status, err)
	}
	if err := m.LoadState(ctx, "/nonexistent"); err == nil || !strings.Contains(err.Error(), "Incoming") {
		t.Errorf("LoadState on a machine without Incoming = %v, want an error naming Config.Incoming", err)
	}
	if err := m.SaveState(ctx, "/nonexistent/dir/state"); err == nil {
		t.Error("SaveState into a missing directory succeeded")
	}

	if err := syscall.Kill(m.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err = m.Wait()
	if err == nil || !strings.Contains(err.Error(), "killed by signal SIGKILL") {
		t.Errorf("Wait() = %v, want 'killed by signal SIGKILL'", err)
	}
	if errors.Is(err, vmm.ErrClosed) {
		t.Errorf("Wait() = %v wraps ErrClosed, but nobody called Close", err)
	}
	if err := m.qmp.Execute(ctx, "query-status", nil, nil); err == nil {
		t.Error("QMP command after QEMU died succeeded")
	}
}

// TestStartFailure checks that QEMU's own error reaches the caller.
func TestStartFailure(t *testing.T) {
	cfg := bootConfig(t, "ping")
	bogus := filepath.Join(t.TempDir(), "not-a-kernel")
	if err := os.WriteFile(bogus, bytes.Repeat([]byte{0x5a}, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg.Kernel = bogus
	before := countFDs(t)
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = m.Start(ctx)
	if err == nil {
		m.Close()
		t.Fatal("Start with a bogus kernel succeeded")
	}
	if !regexp.MustCompile(`exited with status \d+; qemu stderr: .*\S`).MatchString(err.Error()) {
		t.Errorf("Start() = %v, want exit status and QEMU's stderr", err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("Close after failed Start = %v", err)
	}
	if after := countFDs(t); after != before {
		t.Errorf("open fds: %d before New, %d after Close", before, after)
	}
}

// fakeQEMU writes a shell script that never speaks QMP.
func fakeQEMU(t *testing.T, body string) string {
	p := filepath.Join(t.TempDir(), "fake-qemu")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestStartCancelled checks that Start kills the VMM when ctx ends first,
// also when the VMM ignores SIGTERM.
func TestStartCancelled(t *testing.T) {
	kernelFile := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernelFile, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, script string }{
		{"silent", "exec sleep 1000"},
		{"ignores-sigterm", "trap '' TERM; exec sleep 1000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := countFDs(t)
			m, err := New(vmm.Config{Kernel: kernelFile, MemoryMiB: 64, VCPUs: 1, Accel: vmm.TCG, Binary: fakeQEMU(t, tc.script)})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			err = m.Start(ctx)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Start() = %v, want context.DeadlineExceeded", err)
			}
			pid := m.Pid()
			if pid <= 0 {
				t.Fatalf("Pid() = %d after Start timed out, want the pid of the killed process", pid)
			}
			if !processGone(pid) {
				t.Errorf("pid %d still exists after Start failed", pid)
			}
			select {
			case <-m.Done():
			default:
				t.Error("Done() not closed after Start failed")
			}
			if err := m.Close(); err != nil {
				t.Errorf("Close() = %v", err)
			}
			if after := countFDs(t); after != before {
				t.Errorf("open fds: %d before New, %d after Close", before, after)
			}
		})
	}
	t.Run("already-cancelled", func(t *testing.T) {
		m, err := New(withBinary(vmm.Config{Kernel: kernelFile, MemoryMiB: 64, VCPUs: 1, Accel: vmm.TCG}, fakeQEMU(t, "exec sleep 1000")))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := m.Start(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("Start() = %v, want context.Canceled", err)
		}
		if pid := m.Pid(); pid != 0 {
			t.Errorf("Pid() = %d, want 0: no process for a cancelled start", pid)
		}
		m.Close()
	})
}
