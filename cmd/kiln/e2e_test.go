package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
)

func TestMain(m *testing.M) { testutil.Main(m) }

// kiln runs the CLI in-process and returns stdout, stderr and the error.
func kiln(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	return kilnStdin(t, nil, args...)
}

// kilnStdin is kiln with stdin.
func kilnStdin(t *testing.T, stdin io.Reader, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	err := run(ctx, args, stdin, &out, &errb)
	return out.String(), errb.String(), err
}

func sha(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// TestBuildReproducible builds the numpy spec twice through the CLI and
// compares the image bytes.
func TestBuildReproducible(t *testing.T) {
	testutil.NeedTool(t, "mkfs.erofs", "erofs-utils")
	testutil.NeedNetwork(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "kiln.toml"), []byte(testimage.NumpySpec), 0o644); err != nil {
		t.Fatal(err)
	}
	initBin := testutil.KilnInit(t)
	var sums []string
	for i, name := range []string{"a.kimg", "b.kimg"} {
		out := filepath.Join(dir, name)
		stdout, stderr, err := kiln(t, "build", dir, "-o", out, "--init", initBin)
		if err != nil {
			t.Fatalf("kiln build #%d error = %v\nstdout:\n%s\nstderr:\n%s", i+1, err, stdout, stderr)
		}
		if !strings.Contains(stdout, "digest sha256:") {
			t.Errorf("kiln build stdout = %q, want a digest line", stdout)
		}
		if i > 0 && strings.Contains(stdout, "kernel: compile") {
			t.Errorf("kiln build #2 stdout = %q, want it to reuse the cached kernel, not compile one", stdout)
		}
		sums = append(sums, sha(t, out))
	}
	if sums[0] != sums[1] {
		t.Errorf("sha256 of two builds = %s and %s, want them equal", sums[0], sums[1])
	}
}

// modes are kiln run's two ways to start a VM.
var modes = []struct {
	name string
	flag []string
}{{"cold", []string{"--cold"}}, {"snapshot", nil}}

func TestRunNumpy(t *testing.T) {
	img := testimage.Numpy(t)
	phases := map[string][]string{
		"cold":     {"vmm_started", "init_started", "rootfs_mounted", "command_started", "command_exited"},
		"snapshot": {"vmm_started", "state_loaded_resumed", "reseeded", "first_result"},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			args := append(append([]string{"run", img, "--timings"}, m.flag...), "--", "python3", "-c", "import numpy, sys; print(numpy.arange(10).sum(), sys.version_info[:2])")
			stdout, stderr, err := kiln(t, args...)
			if err != nil {
				t.Fatalf("kiln run error = %v\nstderr:\n%s", err, stderr)
			}
			if stdout != "45 (3, 11)\n" {
				t.Errorf("kiln run stdout = %q, want %q", stdout, "45 (3, 11)\n")
			}
			for _, phase := range phases[m.name] {
				if !strings.Contains(stderr, phase) {
					t.Errorf("kiln run --timings stderr = %q, want phase %s", stderr, phase)
				}
			}
		})
	}
}

func TestRunStatusAndStreams(t *testing.T) {
	img := testimage.Numpy(t)
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"exit 3", []string{"python3", "-c", "raise SystemExit(3)"}, 3, "", ""},
		{"stderr and env", []string{"python3", "-c", "import os, sys; print(os.environ['OMP_NUM_THREADS']); print('oops', file=sys.stderr)"}, 0, "1\n", "oops"},
		{"missing program", []string{"/no/such/program"}, 127, "", "no/such/program"},
		{"read-only rootfs, writable tmp", []string{"python3", "-c", "open('/tmp/x','w').write('ok'); print(open('/tmp/x').read())\ntry:\n open('/usr/x','w')\nexcept OSError as e: print(e.errno)"}, 0, "ok\n30\n", ""},
	}
	for _, m := range modes {
		for _, tt := range tests {
			t.Run(m.name+"/"+tt.name, func(t *testing.T) {
				stdout, stderr, err := kiln(t, append(append(append([]string{"run", img}, m.flag...), "--"), tt.args...)...)
				code := 0
				var ec exitCode
				if errors.As(err, &ec) {
					code = int(ec)
				} else if err != nil {
					t.Fatalf("kiln run error = %v\nstderr:\n%s", err, stderr)
				}
				if code != tt.wantCode {
					t.Errorf("kiln run %v exit = %d, want %d (stderr %q)", tt.args, code, tt.wantCode, stderr)
				}
				if stdout != tt.wantStdout {
					t.Errorf("kiln run %v stdout = %q, want %q", tt.args, stdout, tt.wantStdout)
				}
				if !strings.Contains(stderr, tt.wantStderr) {
					t.Errorf("kiln run %v stderr = %q, want it to contain %q", tt.args, stderr, tt.wantStderr)
				}
			})
		}
	}
}

// TestRunStreams: stdin reaches the command with its end, 200,000 lines
// arrive in order and complete, and a command that prints and exits 3
// exits 3 with everything printed, in both modes.
func TestRunStreams(t *testing.T) {
	img := testimage.Numpy(t)
	for _, m := range modes {
		t.Run(m.name+"/stdin", func(t *testing.T) {
			stdout, stderr, err := kilnStdin(t, strings.NewReader("a\nb\n"), append(append([]string{"run", img}, m.flag...), "--", "python3", "-c", "import sys; print(len(sys.stdin.read().split()))")...)
			if err != nil || stdout != "2\n" {
				t.Errorf("printf 'a\\nb\\n' | kiln run = %q, %v, want \"2\\n\"; stderr:\n%s", stdout, err, stderr)
			}
		})
		t.Run(m.name+"/200000 lines", func(t *testing.T) {
			stdout, stderr, err := kiln(t, append(append([]string{"run", img}, m.flag...), "--", "python3", "-c", "for i in range(200000): print(i)")...)
			if err != nil {
				t.Fatalf("kiln run error = %v; stderr:\n%s", err, stderr)
			}
			lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
			if len(lines) != 200000 {
				t.Fatalf("kiln run printed %d lines, want 200000", len(lines))
			}
			for i, l := range lines {
				if l != strconv.Itoa(i) {
					t.Fatalf("line %d = %q, want %d (out of order or cut)", i, l, i)
				}
			}
		})
		t.Run(m.name+"/print then exit 3", func(t *testing.T) {
			stdout, _, err := kiln(t, append(append([]string{"run", img}, m.flag...), "--", "python3", "-c", "import sys\nfor i in range(1000): print(i)\nprint('err', file=sys.stderr)\nsys.exit(3)")...)
			var ec exitCode
			if !errors.As(err, &ec) || int(ec) != 3 {
				t.Errorf("kiln run exit = %v, want status 3", err)
			}
			if n := strings.Count(stdout, "\n"); n != 1000 {
				t.Errorf("kiln run printed %d lines before exiting 3, want 1000", n)
			}
		})
	}
}

func TestRunTimeout(t *testing.T) {
	img := testimage.Numpy(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			t0 := time.Now()
			_, _, err := kiln(t, append(append([]string{"run", img, "--timeout", "20s"}, m.flag...), "--", "python3", "-c", "while True: pass")...)
			if err == nil || !strings.Contains(err.Error(), "timeout after 20s") {
				t.Fatalf("kiln run --timeout 20s error = %v, want a timeout", err)
			}
			if took := time.Since(t0); took > 2*time.Minute {
				t.Errorf("kiln run --timeout 20s took %s", took)
			}
		})
	}
}

func TestInspect(t *testing.T) {
	img := testimage.Numpy(t)
	stdout, _, err := kiln(t, "inspect", img)
	if err != nil {
		t.Fatalf("kiln inspect error = %v", err)
	}
	for _, w := range []string{"numpy", "3.11", "kernel          minimal 6.1.", "linux-source-6.1", "kernel config   sha256:", "none (all built in)", "microvm machine", "rootfs", "erofs/lz4hc"} {
		if !strings.Contains(stdout, w) {
			t.Errorf("kiln inspect output lacks %q:\n%s", w, stdout)
		}
	}
	stdout, _, err = kiln(t, "inspect", "--json", img)
	if err != nil {
		t.Fatalf("kiln inspect --json error = %v", err)
	}
	var doc struct {
		Manifest struct {
			Distributions []struct{ Name, Version string }
		}
		Kernel struct {
			Kind         string `json:"kind"`
			ConfigDigest string `json:"config_digest"`
			Machine      string `json:"machine"`
		}
	}
	if err := json.Unmarshal([]byte(stdout), &doc); err != nil {
		t.Fatalf("kiln inspect --json is not JSON: %v", err)
	}
	if k := doc.Kernel; k.Kind != "minimal" || len(k.ConfigDigest) != 64 || k.Machine != "microvm" {
		t.Errorf("kiln inspect --json kernel = %+v, want kind minimal, a sha256 config digest, machine microvm", k)
	}
	found := false
	for _, d := range doc.Manifest.Distributions {
		if d.Name == "numpy" && d.Version != "" {
			found = true
		}
	}
	if !found {
		t.Errorf("kiln inspect --json distributions = %+v, want numpy with a version", doc.Manifest.Distributions)
	}
}

func TestCorruptImageRejected(t *testing.T) {
	img := testimage.Numpy(t)
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	flipped := bytes.Clone(data)
	flipped[len(flipped)-5000] ^= 0x40
	cases := map[string][]byte{
		"truncated":   data[:len(data)/2],
		"bit-flipped": flipped,
		"empty":       {},
	}
	for name, b := range cases {
		p := filepath.Join(dir, name+".kimg")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		_, stderr, err := kiln(t, "run", p, "--", "true")
		if err == nil {
			t.Errorf("kiln run on a %s image succeeded, want an error", name)
			continue
		}
		if strings.Contains(stderr, "timings") || strings.Contains(err.Error(), "VM") {
			t.Errorf("kiln run on a %s image error = %v, want it rejected before boot", name, err)
		}
	}
}

func TestInvokeCLI(t *testing.T) {
	img := testimage.Numpy(t)
	dir := t.TempDir()
	handler := filepath.Join(dir, "handler.py")
	if err := os.WriteFile(handler, []byte("import numpy as np\n\ndef work(n, scale=1):\n    print('working')\n    return float(np.arange(n).sum()) * scale\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := kiln(t, "invoke", img, "--file", handler, "--function", "work", "--args", "[10]", "--kwargs", `{"scale": 2}`)
	if err != nil {
		t.Fatalf("kiln invoke error = %v\nstderr:\n%s", err, stderr)
	}
	var res struct {
		OK     bool
		Value  struct{ Data json.RawMessage }
		Stdout string
	}
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatalf("kiln invoke output is not JSON: %v\n%s", err, stdout)
	}
	if !res.OK || string(res.Value.Data) != "90.0" && string(res.Value.Data) != "90" || res.Stdout != "working\n" {
		t.Errorf("kiln invoke result = %+v (value %s), want ok, 90, stdout \"working\\n\"", res, res.Value.Data)
	}
	// fd-level output: os.write and a subprocess, captured and streamed.
	fdh := filepath.Join(dir, "fd.py")
	if err := os.WriteFile(fdh, []byte("def f():\n    import os, subprocess\n    os.write(1, b'fd-line\\n')\n    subprocess.run(['python3', '-c', 'print(\"sub-line\")'], check=True)\n    return 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, flags := range [][]string{nil, {"--stream"}} {
		stdout, stderr, err = kiln(t, append([]string{"invoke", img, "--file", fdh, "--function", "f"}, flags...)...)
		if err != nil {
			t.Fatalf("kiln invoke %v error = %v\nstderr:\n%s", flags, err, stderr)
		}
		if err := json.Unmarshal([]byte(stdout), &res); err != nil {
			t.Fatalf("kiln invoke output is not JSON: %v\n%s", err, stdout)
		}
		if res.Stdout != "fd-line\nsub-line\n" {
			t.Errorf("kiln invoke %v stdout = %q, want \"fd-line\\nsub-line\\n\"", flags, res.Stdout)
		}
		if flags != nil && !strings.Contains(stderr, "fd-line\nsub-line\n") {
			t.Errorf("kiln invoke --stream stderr = %q, want the streamed lines", stderr)
		}
	}
	stdout, _, err = kiln(t, "invoke", img, "--function", "math:factorial", "--args", "[5]", "--repeat", "5")
	if err != nil {
		t.Fatalf("kiln invoke --repeat error = %v", err)
	}
	var st map[string]float64
	if err := json.Unmarshal([]byte(stdout), &st); err != nil || st["calls"] != 5 || st["median_ms"] <= 0 {
		t.Errorf("kiln invoke --repeat 5 output = %s (%v), want 5 calls with latencies", stdout, err)
	}
}

// TestRunInterrupt sends Ctrl-C (SIGINT) and SIGTERM to a real kiln run
// whose command is running, and checks that it exits promptly with 130 or
// 143, says "interrupted" and leaves no QEMU behind.
func TestRunInterrupt(t *testing.T) {
	img := testimage.Numpy(t)
	bin := testutil.Kiln(t)
	for _, sig := range []struct {
		name string
		sig  os.Signal
		code int
	}{{"SIGINT", os.Interrupt, 130}, {"SIGTERM", syscall.SIGTERM, 143}} {
		for _, m := range modes {
			t.Run(sig.name+"/"+m.name, func(t *testing.T) {
				cmd := exec.Command(bin, append(append([]string{"run", img}, m.flag...), "--", "python3", "-c", "import time; print('ready', flush=True); time.sleep(600)")...)
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				stdout, err := cmd.StdoutPipe()
				if err != nil {
					t.Fatal(err)
				}
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				// Wait for the command to run (its line streams out), with a deadline.
				ready := make(chan error, 1)
				go func() {
					line, err := bufio.NewReader(stdout).ReadString('\n')
					if err == nil && line != "ready\n" {
						err = fmt.Errorf("first line %q, want ready", line)
					}
					ready <- err
				}()
				select {
				case err := <-ready:
					if err != nil {
						cmd.Process.Kill()
						cmd.Wait()
						t.Fatalf("kiln run: %v; stderr:\n%s", err, stderr.String())
					}
				case <-time.After(3 * time.Minute):
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("the command did not start in 3 minutes; stderr:\n%s", stderr.String())
				}
				vmm := testutil.Children(cmd.Process.Pid)
				if len(vmm) == 0 {
					t.Fatalf("kiln run runs no VMM while its command runs")
				}
				t0 := time.Now()
				if err := cmd.Process.Signal(sig.sig); err != nil {
					t.Fatal(err)
				}
				done := make(chan error, 1)
				go func() { done <- cmd.Wait() }()
				select {
				case err := <-done:
					if err == nil {
						t.Errorf("kiln run exited 0 after %s, want a failure", sig.name)
					}
				case <-time.After(30 * time.Second):
					cmd.Process.Kill()
					<-done
					t.Fatalf("kiln run did not exit within 30 s of %s", sig.name)
				}
				t.Logf("kiln run exited %s after %s", time.Since(t0).Round(time.Millisecond), sig.name)
				if got := cmd.ProcessState.ExitCode(); got != sig.code {
					t.Errorf("kiln run exit status after %s = %d, want %d", sig.name, got, sig.code)
				}
				if !strings.Contains(stderr.String(), "kiln: interrupted") {
					t.Errorf("kiln run stderr after %s = %q, want \"kiln: interrupted\"", sig.name, stderr.String())
				}
				for _, pid := range vmm {
					if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !strings.Contains(string(b), ") Z ") {
						t.Errorf("VMM %d still runs after kiln run exited", pid)
					}
				}
			})
		}
	}
}
