package pid1

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/build/initramfs"
	"github.com/kiln-dev/kiln/internal/build/kernel"
	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/testutil"
)

// TestBoot boots kiln-init under QEMU with a tiny erofs root. It needs
// network access on first run (kernel download) and takes tens of seconds
// under TCG.
func TestBoot(t *testing.T) {
	testutil.NeedQEMU(t)
	testutil.NeedTool(t, "mkfs.erofs", "erofs-utils")
	testutil.NeedNetwork(t) // the kernel, on first use
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	initBin := testutil.KilnInit(t)

	k, err := kernel.Fetch(ctx, nil)
	if err != nil {
		t.Fatalf("kernel.Fetch: %v", err)
	}
	mods, err := k.ModuleClosure(kernel.DefaultModules)
	if err != nil {
		t.Fatalf("ModuleClosure: %v", err)
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	var cpio bytes.Buffer
	if err := initramfs.Write(&cpio, initramfs.ForInit(initBin, mods)); err != nil {
		t.Fatalf("initramfs.Write: %v", err)
	}
	if err := os.WriteFile(initrd, cpio.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}

	root := filepath.Join(dir, "root")
	for _, d := range []string{"usr/bin", "tmp", "run", "var/tmp", "root", "proc", "sys", "dev"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("usr/bin", filepath.Join(root, "bin")); err != nil {
		t.Fatal(err)
	}
	hello, err := os.ReadFile(testutil.GoBuild(t, "./internal/guest/pid1/testdata/hello", true))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/bin/hello"), hello, 0o755); err != nil {
		t.Fatal(err)
	}
	rootfs := filepath.Join(dir, "rootfs.erofs")
	if b, err := exec.CommandContext(ctx, "mkfs.erofs", "--quiet", "--all-root", rootfs, root).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs (apt-get install erofs-utils): %v\n%s", err, b)
	}

	tests := []struct {
		name       string
		mode       string
		argv       []string
		wantLog    []string
		wantCode   int
		wantStdout string
		wantStderr string
		wantError  string
	}{
		{
			name:       "hello",
			mode:       proto.ModeRun,
			argv:       []string{"hello"},
			wantCode:   3,
			wantStdout: "hello host=kiln-test home=/root foo=bar cwd=/tmp tmpwrite=true\n",
			wantStderr: "to stderr\n",
		},
		{name: "missing", mode: proto.ModeRun, argv: []string{"nosuch"}, wantCode: 127, wantError: "nosuch: no such file"},
		{
			name: "serve", mode: proto.ModeServe, argv: []string{"hello"},
			wantLog: []string{"agent args=--port /dev/vport", " --preload numpy,scipy.linalg", "port open=true"},
		},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := filepath.Join(dir, fmt.Sprintf("ctl%d.sock", i))
			console := filepath.Join(dir, fmt.Sprintf("console%d.log", i))
			qctx, qcancel := context.WithTimeout(ctx, 5*time.Minute)
			defer qcancel()
			q := exec.CommandContext(qctx, qemu,
				"-M", "q35", "-accel", "tcg", "-m", "512", "-nodefaults", "-no-user-config",
				"-display", "none", "-no-reboot",
				"-kernel", k.Vmlinuz, "-initrd", initrd,
				"-append", "console=ttyS0 panic=-1 quiet",
				"-serial", "file:"+console,
				"-blockdev", fmt.Sprintf(`{"driver":"raw","node-name":"root","read-only":true,"file":{"driver":"file","filename":%q,"read-only":true}}`, rootfs),
				"-device", "virtio-blk-pci,drive=root",
				"-device", "virtio-serial-pci",
				"-chardev", "socket,id=ctl,path="+sock+",server=on,wait=off",
				"-device", "virtserialport,chardev=ctl,name=kiln.ctl",
				"-chardev", "null,id=agent",
				"-device", "virtserialport,chardev=agent,name=kiln.agent",
			)
			var qout bytes.Buffer
			q.Stdout, q.Stderr = &qout, &qout
			start := time.Now()
			if err := q.Start(); err != nil {
				t.Fatalf("starting qemu: %v", err)
			}
			qdone := make(chan error, 1)
			go func() { qdone <- q.Wait() }()
			defer func() {
				if t.Failed() {
					b, _ := os.ReadFile(console)
					t.Logf("qemu output:\n%s\nconsole:\n%s", qout.String(), b)
				}
			}()

			var conn net.Conn
			for conn == nil {
				c, err := net.Dial("unix", sock)
				if err == nil {
					conn = c
					break
				}
				select {
				case err := <-qdone:
					t.Fatalf("qemu exited before the ctl socket appeared: %v", err)
				case <-time.After(20 * time.Millisecond):
				}
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(4 * time.Minute))
			rd := proto.NewReader(conn, proto.DefaultMax)
			f, err := rd.Next()
			if err != nil {
				t.Fatalf("reading hello: %v", err)
			}
			var hello proto.HelloMsg
			if f.Type != proto.Hello || json.Unmarshal(f.Payload, &hello) != nil || hello.Who != "init" {
				t.Fatalf("first frame = %v %q, want hello from init", f.Type, f.Payload)
			}
			t.Logf("hello after %v (guest uptime %.0f ms)", time.Since(start).Round(time.Millisecond), hello.UptimeMS)
			cfg := proto.RunConfig{
				Mode: tt.mode, Env: map[string]string{"FOO": "bar"},
				Cwd: "/tmp", Hostname: "kiln-test", Entropy: bytes.Repeat([]byte{7}, 64),
				TimeNS: time.Now().UnixNano(),
			}
			if tt.mode == proto.ModeServe {
				cfg.AgentArgv, cfg.Preload = tt.argv, []string{"numpy", "scipy.linalg"}
			} else {
				cfg.Argv = tt.argv
			}
			if err := proto.WriteJSON(conn, proto.Config, cfg); err != nil {
				t.Fatalf("sending config: %v", err)
			}
			var stdout, stderr bytes.Buffer
			var phases, logs []string
			var exit *proto.ExitMsg
			for exit == nil {
				f, err := rd.Next()
				if err != nil {
					t.Fatalf("reading frames: %v (stdout %q, stderr %q, phases %q)", err, stdout.String(), stderr.String(), phases)
				}
				switch f.Type {
				case proto.Stdout:
					stdout.Write(f.Payload)
				case proto.Stderr:
					stderr.Write(f.Payload)
				case proto.Event:
					var ev proto.EventMsg
					if err := json.Unmarshal(f.Payload, &ev); err != nil {
						t.Fatalf("bad event %q: %v", f.Payload, err)
					}
					phases = append(phases, ev.Phase)
					t.Logf("event %s at %.0f ms", ev.Phase, ev.UptimeMS)
				case proto.Log:
					t.Logf("guest log: %s", f.Payload)
					logs = append(logs, string(f.Payload))
				case proto.Exit:
					exit = new(proto.ExitMsg)
					if err := json.Unmarshal(f.Payload, exit); err != nil {
						t.Fatalf("bad exit %q: %v", f.Payload, err)
					}
				default:
					t.Errorf("unexpected frame %v %q", f.Type, f.Payload)
				}
			}
			t.Logf("exit %+v after %v", *exit, time.Since(start).Round(time.Millisecond))
			if exit.Code != tt.wantCode || !strings.Contains(exit.Error, tt.wantError) || (tt.wantError == "" && exit.Error != "") {
				t.Errorf("exit = %+v, want code %d, error containing %q", *exit, tt.wantCode, tt.wantError)
			}
			if stdout.String() != tt.wantStdout || stderr.String() != tt.wantStderr {
				t.Errorf("stdout, stderr = %q, %q; want %q, %q", stdout.String(), stderr.String(), tt.wantStdout, tt.wantStderr)
			}
			allLogs := strings.Join(logs, "\n")
			for _, w := range tt.wantLog {
				if !strings.Contains(allLogs, w) {
					t.Errorf("log frames %q lack %q", logs, w)
				}
			}
			wantPhases := "rootfs_mounted"
			if tt.mode == proto.ModeRun && tt.wantError == "" {
				wantPhases = "rootfs_mounted command_started command_exited"
			}
			if got := strings.Join(phases, " "); got != wantPhases {
				t.Errorf("events = %q, want %q", got, wantPhases)
			}
			// Init powers the VM off; QEMU then exits by itself.
			select {
			case err := <-qdone:
				var ee *exec.ExitError
				if err != nil && !errors.As(err, &ee) {
					t.Errorf("qemu: %v", err)
				}
			case <-time.After(2 * time.Minute):
				t.Errorf("qemu still running 2 minutes after exit frame: init did not power off")
			}
		})
	}
}
