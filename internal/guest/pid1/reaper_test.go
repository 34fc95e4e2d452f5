package pid1

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// TestReaper runs the reaper in a child test process, since it reaps every
// child of the process it runs in.
func TestReaper(t *testing.T) {
	if os.Getenv("KILN_INIT_REAPER_CHILD") == "1" {
		reaperChild(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestReaper$", "-test.v")
	cmd.Env = append(os.Environ(), "KILN_INIT_REAPER_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("reaper child test failed: %v\n%s", err, out)
	}
}

func reaperChild(t *testing.T) {
	r := startReaper()
	for _, tt := range []struct {
		script string
		want   int
	}{
		{"exit 5", 5},
		{"(sleep 0.2; exit 9) & exit 0", 0}, // leaves an orphan behind
		{"exit 0", 0},
		{"kill -9 $$", 128 + 9},
	} {
		ch, err := r.start(func() (int, error) {
			p, err := os.StartProcess("/bin/sh", []string{"sh", "-c", tt.script}, &os.ProcAttr{
				Files: []*os.File{nil, os.Stdout, os.Stderr},
				Sys:   &syscall.SysProcAttr{Setsid: true},
			})
			if err != nil {
				return 0, err
			}
			defer p.Release()
			return p.Pid, nil
		})
		if err != nil {
			t.Fatalf("start(%q): %v", tt.script, err)
		}
		select {
		case ws := <-ch:
			if got := exitMsg(ws).Code; got != tt.want {
				t.Errorf("sh -c %q: exit code %d, want %d", tt.script, got, tt.want)
			}
		case <-time.After(time.Minute):
			t.Fatalf("sh -c %q: no exit status after a minute", tt.script)
		}
	}
}
