package qemu

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"
)

var countRE = regexp.MustCompile(`count (\d+) token ([0-9a-f]+)`)

// counts returns the counter values and the token printed on a console.
func counts(t *testing.T, console []byte) (min, max int, tokens map[string]bool) {
	t.Helper()
	min, max, tokens = -1, -1, map[string]bool{}
	for _, m := range countRE.FindAllSubmatch(console, -1) {
		n, _ := strconv.Atoi(string(m[1]))
		if min < 0 || n < min {
			min = n
		}
		if n > max {
			max = n
		}
		tokens[string(m[2])] = true
	}
	return min, max, tokens
}

// TestSnapshotRestore saves a guest printing a counter and restores it into
// a new QEMU with a private copy-on-write mapping of the RAM file: the
// counter must go on from where it was, with the same boot token.
func TestSnapshotRestore(t *testing.T) {
	t.Run("ram-file", func(t *testing.T) { testSnapshotRestore(t, true) })
	// Without a RAM file the guest RAM travels in the state file.
	t.Run("ram-in-state", func(t *testing.T) { testSnapshotRestore(t, false) })
}

func testSnapshotRestore(t *testing.T, ramFile bool) {
	dir := t.TempDir()
	ram := filepath.Join(dir, "ram,1")
	state := filepath.Join(dir, "state,1")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	cfg := bootConfig(t, "counter")
	cfg.Ports = []string{"kiln.ctl"}
	if ramFile {
		cfg.RAMFile = ram
		cfg.RAMShared = true
	}
	src := startMachine(t, cfg)
	waitConsole(t, src, "count 3 ")
	if err := src.SaveState(ctx, state); err != nil {
		t.Fatalf("SaveState: %v", err)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := src.qmp.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "postmigrate" {
		t.Errorf("source status after SaveState = %q, %v; want postmigrate (paused)", st.Status, err)
	}
	if fi, err := os.Stat(state); err != nil || fi.Size() == 0 {
		t.Fatalf("state file: %v, %v", fi, err)
	}
	if ents, _ := filepath.Glob(filepath.Join(dir, ".*")); len(ents) != 0 {
		t.Errorf("temp files left: %v", ents)
	}
	// The console may still be delivering the last lines (they are in the
	// saved state anyway): Close returns once the console is drained.
	src.Close()
	_, before, tokens := counts(t, src.Console())
	if len(tokens) != 1 {
		t.Fatalf("source console has tokens %v, want one", tokens)
	}
	var ramInfo os.FileInfo
	if ramFile {
		var err error
		if ramInfo, err = os.Stat(ram); err != nil {
			t.Fatal(err)
		}
	}

	cfg.RAMShared = false
	cfg.Incoming = true
	dst := startMachine(t, cfg)
	if err := dst.LoadState(ctx, state); err != nil {
		t.Fatalf("LoadState: %v", err)
	}
	want := before + 3
	waitConsole(t, dst, "count "+strconv.Itoa(want)+" ")
	min, _, dstTokens := counts(t, dst.Console())
	if len(dstTokens) != 1 || !dstTokens[onlyKey(tokens)] {
		t.Errorf("restored console tokens %v, want just the source's %v (the guest rebooted?)", dstTokens, tokens)
	}
	if min < before || min > before+1 {
		t.Errorf("restored counter starts at %d, want it to go on from the source's last value %d", min, before)
	}
	dst.Close()
	if !ramFile {
		return
	}
	after, err := os.Stat(ram)
	if err != nil {
		t.Fatal(err)
	}
	if !after.ModTime().Equal(ramInfo.ModTime()) {
		t.Errorf("RAM file modified by the restored (share=off) machine: mtime %v, was %v", after.ModTime(), ramInfo.ModTime())
	}
}

func onlyKey(m map[string]bool) string {
	for k := range m {
		return k
	}
	return ""
}
