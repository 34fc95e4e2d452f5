package main

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
)

// TestVolumeCLI: kiln run --volume, as the user types it (a
// relative host directory), in the default (snapshot) mode and --cold,
// with an :rw volume receiving a file; kiln invoke --volume.
func TestVolumeCLI(t *testing.T) {
	img := testimage.Numpy(t)
	dir := t.TempDir()
	t.Chdir(dir)
	for _, d := range []string{"data", "out"} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile("data/x.csv", []byte("a,b\n1,2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, mode := range [][]string{nil, {"--cold"}} {
		args := append([]string{"run", img}, mode...)
		args = append(args, "--volume", "./data:/data", "--volume", "out:/out:rw", "--",
			"python3", "-c", "print(open('/data/x.csv').read(), end=''); open('/out/y.txt', 'w').write('written')")
		stdout, stderr, err := kiln(t, args...)
		if err != nil || stdout != "a,b\n1,2\n" {
			t.Errorf("kiln run %v --volume ./data:/data = %q, %v; want the host file\nstderr:\n%s", mode, stdout, err, stderr)
		}
		b, err := os.ReadFile("out/y.txt")
		if err != nil || string(b) != "written" {
			t.Errorf("kiln run %v: out/y.txt = %q, %v; want the guest's write", mode, b, err)
		}
		os.Remove("out/y.txt")
	}
	handler := filepath.Join(dir, "h.py")
	if err := os.WriteFile(handler, []byte("def rows(p):\n    return len(open(p).read().split())\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := kiln(t, "invoke", img, "--volume", "data:/data", "--file", handler, "--function", "rows", "--args", `["/data/x.csv"]`)
	var res struct {
		OK    bool
		Value struct{ Data json.RawMessage }
	}
	if err != nil || json.Unmarshal([]byte(stdout), &res) != nil || !res.OK || string(res.Value.Data) != "2" {
		t.Errorf("kiln invoke --volume data:/data = %s, %v; want value 2\nstderr:\n%s", stdout, err, stderr)
	}
}

// TestVolumeFlagErrors: a bad --volume fails before any VM, saying what
// to do.
func TestVolumeFlagErrors(t *testing.T) {
	t.Chdir(t.TempDir())
	if err := os.WriteFile("file", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		flag, want string
	}{
		{"missing:/data", "does not exist: create it or fix the path"},
		{"file:/data", "is not a directory"},
		{".:/usr/lib", "would shadow the system directory /usr"},
		{".:data", "is not absolute"},
		{".:/data:wr", `mode "wr": want ro or rw`},
	} {
		for _, args := range [][]string{{"run", "none.kimg"}, {"invoke", "none.kimg", "--function", "m:f"}} {
			_, _, err := kiln(t, append(args, "--volume", tt.flag)...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("kiln %s --volume %s error = %v, want one containing %q", args[0], tt.flag, err, tt.want)
			}
		}
	}
}

// TestServeVolume: kiln serve --volume mounts the operator's directories
// into the endpoint's VMs; a task reads the read-only one and writes the
// :rw one, and the write lands on the host.
func TestServeVolume(t *testing.T) {
	img := testimage.Numpy(t)
	bin := testutil.Kiln(t)
	dir := t.TempDir()
	images, data, out, state := filepath.Join(dir, "images"), filepath.Join(dir, "data"), filepath.Join(dir, "out"), filepath.Join(dir, "state")
	for _, d := range []string{images, data, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(img, filepath.Join(images, "numpy.kimg")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, "x.csv"), []byte("a,b\n1,2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", "--images", images, "--state", state, "--listen", "127.0.0.1:0",
		"--volume", data+":/data", "--volume", out+":/out:rw")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
	})
	sc := bufio.NewScanner(stderr)
	url := ""
	for url == "" && sc.Scan() {
		if m := regexp.MustCompile(`serving on (http://\S+)`).FindStringSubmatch(sc.Text()); m != nil {
			url = m[1]
		}
	}
	if url == "" {
		t.Fatalf("kiln serve --volume did not start serving: %v", cmd.Wait())
	}
	go io.Copy(io.Discard, stderr)
	tok, err := os.ReadFile(filepath.Join(state, "token"))
	if err != nil {
		t.Fatal(err)
	}
	handler := filepath.Join(dir, "h.py")
	src := "def rows(p):\n    n = len(open(p).read().split())\n    open('/out/rows.txt', 'w').write(str(n))\n    return n\n"
	if err := os.WriteFile(handler, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, errOut, err := kiln(t, "submit", "--url", url, "--token", strings.TrimSpace(string(tok)), "--image", "numpy",
		"--file", handler, "--function", "rows", "--args", `["/data/x.csv"]`, "--wait", "5m")
	var tv struct {
		State  string
		Error  string
		Result struct {
			Value struct{ Data json.RawMessage }
		}
	}
	if err != nil || json.Unmarshal([]byte(stdout), &tv) != nil || tv.State != "succeeded" || string(tv.Result.Value.Data) != "2" {
		t.Fatalf("a served task reading /data/x.csv = %s, %v; want succeeded with 2\nstderr:\n%s", stdout, err, errOut)
	}
	if b, err := os.ReadFile(filepath.Join(out, "rows.txt")); err != nil || string(b) != "2" {
		t.Errorf("out/rows.txt on the host = %q, %v; want the served task's write \"2\"", b, err)
	}
}
