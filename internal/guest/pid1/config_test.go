package pid1

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/guest/proto"
)

func TestDecodeConfig(t *testing.T) {
	tests := []struct {
		in      string
		want    proto.RunConfig
		wantErr string
	}{
		{
			in:   `{"mode":"run","argv":["python3","-c","1"]}`,
			want: proto.RunConfig{Mode: "run", Argv: []string{"python3", "-c", "1"}, Cwd: "/", Hostname: "kiln", TmpfsMiB: 64},
		},
		{
			in: `{"mode":"serve","agent_argv":["/usr/bin/python3","-u","/usr/lib/kiln/agent.py"],"preload":["numpy"],"cwd":"/tmp","hostname":"h","tmpfs_mib":16,"entropy":"AQID","time_ns":5,"env":{"A":"b"}}`,
			want: proto.RunConfig{Mode: "serve", AgentArgv: []string{"/usr/bin/python3", "-u", "/usr/lib/kiln/agent.py"},
				Preload: []string{"numpy"}, Cwd: "/tmp", Hostname: "h", TmpfsMiB: 16, Entropy: []byte{1, 2, 3}, TimeNS: 5, Env: map[string]string{"A": "b"}},
		},
		{in: `{"mode":"run"}`, wantErr: "argv is empty"},
		{in: `{"mode":"run","argv":[""]}`, wantErr: "argv is empty"},
		{in: `{"mode":"serve","argv":["x"]}`, wantErr: "agent_argv"},
		{in: `{"mode":"debug","argv":["x"]}`, wantErr: "unknown mode"},
		{in: `{"mode":`, wantErr: "decoding config"},
	}
	for _, tt := range tests {
		got, err := decodeConfig([]byte(tt.in))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("decodeConfig(%s) error = %v, want containing %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("decodeConfig(%s) error = %v", tt.in, err)
			continue
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("decodeConfig(%s) mismatch (-want +got):\n%s", tt.in, diff)
		}
	}
}

func FuzzDecodeConfig(f *testing.F) {
	f.Add([]byte(`{"mode":"run","argv":["python3","-c","1"]}`))
	f.Add([]byte(`{"mode":"serve","agent_argv":["a"],"preload":["numpy","scipy.linalg"],"tmpfs_mib":-1}`))
	f.Add([]byte(`{"mode":"run","argv":[],"entropy":"!!"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := decodeConfig(b)
		if err != nil {
			return
		}
		if c.Cwd == "" || c.Hostname == "" || c.TmpfsMiB <= 0 {
			t.Errorf("decodeConfig(%q) = %+v: defaults not applied", b, c)
		}
		if c.Mode == proto.ModeRun && (len(c.Argv) == 0 || c.Argv[0] == "") {
			t.Errorf("decodeConfig(%q) accepted run mode without argv", b)
		}
		if c.Mode == proto.ModeServe && (len(c.AgentArgv) == 0 || c.AgentArgv[0] == "") {
			t.Errorf("decodeConfig(%q) accepted serve mode without agent_argv", b)
		}
	})
}

func TestEnviron(t *testing.T) {
	tests := []struct {
		in   map[string]string
		want []string
	}{
		{nil, []string{"HOME=/root", "PATH=/usr/local/bin:/usr/bin:/bin"}},
		{map[string]string{"Z": "1", "PATH": "/opt/bin", "A": "x=y"}, []string{"A=x=y", "HOME=/root", "PATH=/opt/bin", "Z=1"}},
		{map[string]string{"HOME": "/tmp"}, []string{"HOME=/tmp", "PATH=/usr/local/bin:/usr/bin:/bin"}},
	}
	for _, tt := range tests {
		if diff := cmp.Diff(tt.want, environ(tt.in)); diff != "" {
			t.Errorf("environ(%v) mismatch (-want +got):\n%s", tt.in, diff)
		}
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, d := range []string{a, b, filepath.Join(b, "dir")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p string, mode os.FileMode) {
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(a, "noexec"), 0o644)
	write(filepath.Join(b, "noexec"), 0o755)
	write(filepath.Join(b, "tool"), 0o755)
	path := a + ":" + b
	tests := []struct {
		file, want, wantErr string
	}{
		{file: "tool", want: filepath.Join(b, "tool")},
		{file: "noexec", want: filepath.Join(b, "noexec")}, // skips the non-executable one in a
		{file: "dir", wantErr: "no such file in PATH"},
		{file: "nosuch", wantErr: "nosuch: no such file"},
		{file: filepath.Join(a, "noexec"), wantErr: "not executable"},
		{file: filepath.Join(b, "tool"), want: filepath.Join(b, "tool")},
		{file: "/nonexistent/x", wantErr: "/nonexistent/x: no such file"},
	}
	for _, tt := range tests {
		got, err := lookPath(tt.file, path)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("lookPath(%q) = %q, %v; want error containing %q", tt.file, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("lookPath(%q) = %q, %v; want %q", tt.file, got, err, tt.want)
		}
	}
}

func TestAgentCommand(t *testing.T) {
	base := proto.RunConfig{AgentArgv: []string{"/usr/bin/python3", "-u", "/usr/lib/kiln/agent.py"}}
	got := agentCommand(base, "/dev/vport0p2")
	want := []string{"/usr/bin/python3", "-u", "/usr/lib/kiln/agent.py", "--port", "/dev/vport0p2"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("agentCommand mismatch (-want +got):\n%s", diff)
	}
	withPreload := base
	withPreload.Preload = []string{"numpy", "scipy.linalg"}
	got = agentCommand(withPreload, "/dev/vport0p2")
	want = append(want, "--preload", "numpy,scipy.linalg")
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("agentCommand with preload mismatch (-want +got):\n%s", diff)
	}
	if len(base.AgentArgv) != 3 {
		t.Errorf("agentCommand modified the config's agent_argv: %q", base.AgentArgv)
	}
}

func TestFindPort(t *testing.T) {
	dir := t.TempDir()
	for port, name := range map[string]string{"vport0p1": "kiln.ctl\n", "vport0p2": "kiln.agent\n", "vport1p1": ""} {
		if err := os.MkdirAll(filepath.Join(dir, port), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, port, "name"), []byte(name), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "vport2p1"), 0o755); err != nil { // no name file
		t.Fatal(err)
	}
	for name, want := range map[string]string{"kiln.ctl": "vport0p1", "kiln.agent": "vport0p2"} {
		if got, err := findPort(dir, name); err != nil || got != want {
			t.Errorf("findPort(%q) = %q, %v; want %q", name, got, err, want)
		}
	}
	if got, err := findPort(dir, "kiln.other"); err == nil {
		t.Errorf("findPort(kiln.other) = %q, want error", got)
	}
	if got, err := findPort(filepath.Join(dir, "missing"), "kiln.ctl"); err == nil {
		t.Errorf("findPort(missing dir) = %q, want error", got)
	}
}

func TestParseOOMKill(t *testing.T) {
	tests := []struct {
		in     string
		want   uint64
		wantOK bool
	}{
		{"nr_free_pages 1234\noom_kill 0\npgfault 9\n", 0, true},
		{"nr_free_pages 1234\noom_kill 17\n", 17, true},
		{"oom_kill_other 5\n", 0, false},
		{"oom_kill x\n", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		got, ok := parseOOMKill(strings.NewReader(tt.in))
		if got != tt.want || ok != tt.wantOK {
			t.Errorf("parseOOMKill(%q) = %d, %v; want %d, %v", tt.in, got, ok, tt.want, tt.wantOK)
		}
	}
	// The real file of this machine parses.
	if f, err := os.Open("/proc/vmstat"); err == nil {
		defer f.Close()
		if _, ok := parseOOMKill(f); !ok {
			t.Errorf("parseOOMKill(/proc/vmstat) found no oom_kill counter")
		}
	}
}

func FuzzParseOOMKill(f *testing.F) {
	f.Add("oom_kill 3\n")
	f.Add("a 1\noom_kill 18446744073709551615\n")
	f.Add("oom_kill -1")
	f.Fuzz(func(t *testing.T, s string) {
		n, ok := parseOOMKill(strings.NewReader(s))
		if !ok && n != 0 {
			t.Errorf("parseOOMKill(%q) = %d, false; want 0 when not found", s, n)
		}
	})
}

func TestRandPoolInfo(t *testing.T) {
	entropy := bytes.Repeat([]byte{0xAB}, 64)
	b := randPoolInfo(entropy)
	if len(b) != 8+64 {
		t.Fatalf("len(randPoolInfo(64 bytes)) = %d, want 72", len(b))
	}
	if got := binary.LittleEndian.Uint32(b[0:]); got != 512 {
		t.Errorf("entropy_count = %d, want 512 bits", got)
	}
	if got := binary.LittleEndian.Uint32(b[4:]); got != 64 {
		t.Errorf("buf_size = %d, want 64", got)
	}
	if !bytes.Equal(b[8:], entropy) {
		t.Errorf("buf = %x, want %x", b[8:], entropy)
	}
	// The ioctl numbers are those of <linux/random.h>.
	if unix.RNDADDENTROPY != 0x40085203 || unix.RNDRESEEDCRNG != 0x5207 {
		t.Errorf("RNDADDENTROPY, RNDRESEEDCRNG = %#x, %#x", unix.RNDADDENTROPY, unix.RNDRESEEDCRNG)
	}
}

func TestSplitLines(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"a\nb\n", []string{"a", "b"}},
		{"a\r\n\nlast", []string{"a", "", "last"}},
		{strings.Repeat("x", 40) + "\ny\n", []string{strings.Repeat("x", 16), strings.Repeat("x", 16), strings.Repeat("x", 8), "y"}},
	}
	for _, tt := range tests {
		var got []string
		err := splitLines(iotest.OneByteReader(strings.NewReader(tt.in)), 16, func(l string) { got = append(got, l) })
		if err != nil {
			t.Errorf("splitLines(%q) error = %v", tt.in, err)
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("splitLines(%q) mismatch (-want +got):\n%s", tt.in, diff)
		}
	}
}

func TestExitMsg(t *testing.T) {
	tests := []struct {
		ws   unix.WaitStatus
		want proto.ExitMsg
	}{
		{unix.WaitStatus(0), proto.ExitMsg{Code: 0}},
		{unix.WaitStatus(3 << 8), proto.ExitMsg{Code: 3}},
		{unix.WaitStatus(9), proto.ExitMsg{Code: 137, Signal: "SIGKILL"}},
	}
	for _, tt := range tests {
		if diff := cmp.Diff(tt.want, exitMsg(tt.ws)); diff != "" {
			t.Errorf("exitMsg(%#x) mismatch (-want +got):\n%s", uint32(tt.ws), diff)
		}
	}
}
