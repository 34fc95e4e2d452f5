package simfs

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// mount serves a fresh backing directory and unmounts it when the test ends,
// also when it fails.
func mount(t *testing.T, p Params) (*FS, string) {
	t.Helper()
	backing, mnt := t.TempDir(), t.TempDir()
	f, err := Mount(backing, mnt, p, nil)
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := f.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
	})
	return f, backing
}

func TestCountsEveryLookup(t *testing.T) {
	f, backing := mount(t, Presets["local"])
	const n = 50
	if err := os.MkdirAll(filepath.Join(backing, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := os.WriteFile(filepath.Join(backing, "d", strconv.Itoa(i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	before := f.Counts()
	// Stat every file twice: with entry and attribute timeouts 0 the
	// second round must reach the filesystem again.
	for round := 0; round < 2; round++ {
		for i := 0; i < n; i++ {
			if _, err := os.Stat(filepath.Join(f.Mountpoint, "d", strconv.Itoa(i))); err != nil {
				t.Fatal(err)
			}
		}
	}
	d := f.Counts().Sub(before)
	if got := d.Ops[OpLookup]; got < 2*n {
		t.Errorf("lookups after stat'ing %d files twice = %d, want >= %d (kernel caching must be off); counts: %s", n, got, 2*n, d)
	}
	// A missing file is looked up every time too (negative timeout 0).
	before = f.Counts()
	for i := 0; i < 3; i++ {
		if _, err := os.Stat(filepath.Join(f.Mountpoint, "missing")); !os.IsNotExist(err) {
			t.Fatalf("Stat(missing) = %v, want not-exist", err)
		}
	}
	if got := f.Counts().Sub(before).Ops[OpLookup]; got < 3 {
		t.Errorf("lookups of a missing name 3 times = %d, want >= 3", got)
	}
}

func TestOpenReadCounts(t *testing.T) {
	f, backing := mount(t, Presets["local"])
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	if err := os.WriteFile(filepath.Join(backing, "big"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	before := f.Counts()
	for i := 0; i < 3; i++ {
		got, err := os.ReadFile(filepath.Join(f.Mountpoint, "big"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("ReadFile through the model returned %d bytes that differ from the %d written", len(got), len(data))
		}
	}
	d := f.Counts().Sub(before)
	if got := d.Ops[OpOpen]; got != 3 {
		t.Errorf("opens after reading a file 3 times = %d, want 3; counts: %s", got, d)
	}
	// No kept page cache: every open re-reads the data through the model.
	if d.ReadBytes < int64(3*len(data)) {
		t.Errorf("bytes read through the model = %d, want >= %d", d.ReadBytes, 3*len(data))
	}
	if d.Ops[OpRead] == 0 || d.Meta() == 0 || d.Total() <= d.Meta() {
		t.Errorf("counts = %s (meta %d, total %d), want reads, metadata ops and total > meta", d, d.Meta(), d.Total())
	}
	ents, err := os.ReadDir(f.Mountpoint)
	if err != nil || len(ents) != 1 {
		t.Fatalf("ReadDir = %v, %v, want 1 entry", ents, err)
	}
	c := f.Counts()
	if c.Ops[OpOpenDir] == 0 || c.Ops[OpReadDir]+c.Ops[OpReadDirPlus] == 0 {
		t.Errorf("after ReadDir counts = %s, want opendir and readdir", c)
	}
}

func TestMetadataLatency(t *testing.T) {
	const lat = 20 * time.Millisecond
	f, backing := mount(t, Params{Name: "test", Meta: lat})
	if err := os.WriteFile(filepath.Join(backing, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	const n = 10
	before := f.Counts()
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if _, err := os.Stat(filepath.Join(f.Mountpoint, "f")); err != nil {
			t.Fatal(err)
		}
	}
	el := time.Since(t0)
	d := f.Counts().Sub(before)
	// Lower bounds only: a loaded machine can only make it slower.
	if min := time.Duration(d.Meta()) * lat; el < min || d.Meta() < n {
		t.Errorf("%d stats with %d metadata ops at %s took %s, want >= %s and >= %d ops", n, d.Meta(), lat, el, min, n)
	}
	if d.Injected < time.Duration(d.Meta())*lat {
		t.Errorf("injected delay = %s, want >= %d × %s", d.Injected, d.Meta(), lat)
	}
	// The model can change while mounted.
	f.SetParams(Params{Name: "none"})
	before = f.Counts()
	if _, err := os.Stat(filepath.Join(f.Mountpoint, "f")); err != nil {
		t.Fatal(err)
	}
	if d := f.Counts().Sub(before); d.Injected != 0 {
		t.Errorf("injected delay with latency 0 = %s, want 0", d.Injected)
	}
}

func TestReadBandwidth(t *testing.T) {
	// 2 MB at 20 MB/s is at least 100 ms of transfer.
	f, backing := mount(t, Params{Name: "test", Read: time.Millisecond, BandwidthMBps: 20})
	data := make([]byte, 2_000_000)
	if err := os.WriteFile(filepath.Join(backing, "f"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	before := f.Counts()
	t0 := time.Now()
	if _, err := os.ReadFile(filepath.Join(f.Mountpoint, "f")); err != nil {
		t.Fatal(err)
	}
	el := time.Since(t0)
	d := f.Counts().Sub(before)
	// Requests may overlap (readahead), their transfers may not.
	want := 100 * time.Millisecond
	if el < want || d.ReadBytes < int64(len(data)) {
		t.Errorf("reading 2 MB at 20 MB/s in %d requests (%d bytes) took %s, want >= %s", d.Ops[OpRead], d.ReadBytes, el, want)
	}
}

func TestUnmountIdempotent(t *testing.T) {
	backing, mnt := t.TempDir(), t.TempDir()
	f, err := Mount(backing, mnt, Presets["local"], nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Unmount(); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	if err := f.Unmount(); err != nil {
		t.Fatalf("second Unmount: %v", err)
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(mounts, []byte(" "+mnt+" ")) {
		t.Errorf("%s still mounted after Unmount", mnt)
	}
}

func TestParseParams(t *testing.T) {
	tests := []struct {
		in   string
		want Params
	}{
		{"local", Presets["local"]},
		{"lustre-idle", Presets["lustre-idle"]},
		{"meta=1ms,read=200us,bw=500", Params{Name: "custom", Meta: time.Millisecond, Read: 200 * time.Microsecond, BandwidthMBps: 500}},
		{"lustre-busy meta=20ms", Params{Name: "custom", Meta: 20 * time.Millisecond, Read: 2 * time.Millisecond, BandwidthMBps: 200}},
		{"meta=0.1", Params{Name: "custom", Meta: 100 * time.Microsecond}},
		{"bw=100MB/s", Params{Name: "custom", BandwidthMBps: 100}},
	}
	for _, tt := range tests {
		got, err := ParseParams(tt.in)
		if err != nil {
			t.Errorf("ParseParams(%q) error %v", tt.in, err)
			continue
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("ParseParams(%q) mismatch (-want +got):\n%s", tt.in, diff)
		}
	}
	for _, bad := range []string{"", "nfs", "meta=-1ms", "meta=fast", "bw=-3", "color=red", "meta=1ms,lustre-idle", "bw=NaN"} {
		if p, err := ParseParams(bad); err == nil {
			t.Errorf("ParseParams(%q) = %v, want an error", bad, p)
		}
	}
}

func FuzzParseParams(f *testing.F) {
	for _, s := range []string{"local", "lustre-busy,meta=3ms", "meta=1,read=2,bw=3", "bw=", "meta=1h", "a=b=c", ","} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseParams(s)
		if err != nil {
			return
		}
		if p.Meta < 0 || p.Read < 0 || p.BandwidthMBps < 0 {
			t.Fatalf("ParseParams(%q) = %v: negative setting", s, p)
		}
		// The printed form is stable and names the model.
		if p.String() == "" {
			t.Fatalf("ParseParams(%q).String() is empty", s)
		}
	})
}

func TestWithMeta(t *testing.T) {
	p := Presets["lustre-idle"].WithMeta(time.Millisecond).WithMeta(10 * time.Millisecond)
	if p.Name != "lustre-idle@meta=10ms" || p.Meta != 10*time.Millisecond || p.Read != Presets["lustre-idle"].Read {
		t.Errorf("WithMeta twice = %+v, want name lustre-idle@meta=10ms, meta 10ms, read unchanged", p)
	}
}
