package bench

import (
	"context"
	"encoding/csv"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/testutil"
)

func TestMain(m *testing.M) { testutil.Main(m) }

// quickOptions runs in temporary directories, with the test kiln-init.
func quickOptions(t *testing.T) Options {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kiln bench needs root (FUSE mount with allow_other, loop mounts)")
	}
	return Options{
		Out:      t.TempDir(),
		Quick:    true,
		Work:     t.TempDir(),
		Init:     testutil.KilnInit(t),
		Progress: testWriter{t},
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func readCSV(t *testing.T, path string) []map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	var rows []map[string]string
	for _, r := range recs[1:] {
		m := map[string]string{}
		for i, c := range recs[0] {
			m[c] = r[i]
		}
		rows = append(rows, m)
	}
	return rows
}

func checkFiles(t *testing.T, dir string, names ...string) {
	t.Helper()
	for _, n := range names {
		st, err := os.Stat(filepath.Join(dir, n))
		if err != nil || st.Size() == 0 {
			t.Errorf("output %s: %v (size %v), want a non-empty file", n, err, st)
		}
	}
}

func noSimMounts(t *testing.T) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "kiln-bench-mnt-") || strings.Contains(l, "kiln-bench-loop-") {
			t.Errorf("mount left behind: %s", l)
		}
	}
}

// TestQuick is the smoke test of every experiment: it runs `kiln bench all
// --quick` and checks the outputs and the one deterministic claim, that the
// image needs far fewer metadata operations than the many-files tree.
func TestQuick(t *testing.T) {
	o := quickOptions(t)
	// Reuse the test image builder's numpy image for the VM rows.
	o.Images = map[string]string{"numpy": testutil.NumpyImage(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	t.Cleanup(func() { noSimMounts(t) })
	reps, err := All(ctx, o)
	if err != nil {
		t.Fatalf("All: %v", err)
	}
	if len(reps) != 3 {
		t.Fatalf("All returned %d reports, want 3", len(reps))
	}
	checkFiles(t, o.Out, "files.csv", "files.md", "files.png", "imports.csv", "imports.md", "imports.png", "imports-ops.png",
		"coldstart.csv", "coldstart.md", "coldstart.png")

	files := readCSV(t, filepath.Join(o.Out, "files.csv"))
	if len(files) < 12 {
		t.Errorf("files.csv has %d rows, want >= 12 (4 N × 3+ configs)", len(files))
	}

	meta := map[string]int64{}
	for _, r := range readCSV(t, filepath.Join(o.Out, "imports.csv")) {
		if r["package"] != "numpy" || r["meta_latency_ms"] != "1" {
			continue
		}
		n, err := strconv.ParseInt(r["meta_ops"], 10, 64)
		if err != nil {
			t.Fatalf("imports.csv meta_ops %q: %v", r["meta_ops"], err)
		}
		meta[r["source"]] = n
	}
	tree := meta[ModeTree]
	for _, mode := range []string{ModeLoop, ModeVM} {
		img, ok := meta[mode]
		if !ok {
			t.Errorf("imports.csv has no numpy row for %q at 1 ms; rows: %v", mode, meta)
			continue
		}
		if img <= 0 || tree < 100*img {
			t.Errorf("metadata ops: tree %d, %s %d; want the tree to need >= 100× more", tree, mode, img)
		}
	}

	cold := readCSV(t, filepath.Join(o.Out, "coldstart.csv"))
	if len(cold) != 4 {
		t.Fatalf("coldstart.csv has %d rows, want 4", len(cold))
	}
	for _, r := range cold {
		if r["runs"] != "2" || r["ratio_to_container"] == "" {
			t.Errorf("coldstart row %q: runs %s ratio %q, want 2 runs and a ratio", r["row"], r["runs"], r["ratio_to_container"])
		}
	}
	md, err := os.ReadFile(filepath.Join(o.Out, "coldstart.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"lustre-idle: meta=500µs", "kernel:", "accelerator"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("coldstart.md lacks %q (model parameters and environment must be recorded)", want)
		}
	}
}

func TestParseImportTime(t *testing.T) {
	tests := []struct {
		out  string
		want float64
		ok   bool
	}{
		{"KILN_IMPORT_S=0.123456\n", 0.123456, true},
		{"warning\nKILN_IMPORT_S=2.5\n", 2.5, true},
		{"Traceback …", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		got, err := parseImportTime(tt.out)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseImportTime(%q) = %v, %v; want %v, ok %v", tt.out, got, err, tt.want, tt.ok)
		}
	}
}

func FuzzParseImportTime(f *testing.F) {
	for _, s := range []string{"KILN_IMPORT_S=1.5", "KILN_IMPORT_S=", "x KILN_IMPORT_S=1e-3 y", "KILN_IMPORT_S=NaN"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := parseImportTime(s)
		if err == nil && !strings.Contains(s, importTag) {
			t.Fatalf("parseImportTime(%q) = %v without the tag", s, v)
		}
	})
}

func TestSpecs(t *testing.T) {
	for _, p := range Packages {
		s, _, err := Spec(p)
		if err != nil {
			t.Errorf("Spec(%q): %v", p, err)
			continue
		}
		if len(s.Debian) != 1 || s.Debian[0] != "python3-"+p {
			t.Errorf("Spec(%q).Debian = %v, want [python3-%s]", p, s.Debian, p)
		}
	}
	if _, _, err := Spec("tensorflow"); err == nil {
		t.Error("Spec(tensorflow) succeeded, want an error")
	}
}

func TestSummarize(t *testing.T) {
	got := summarize([]float64{3, 1, 2})
	if got != (stats{N: 3, Min: 1, Max: 3, Mean: 2}) {
		t.Errorf("summarize(3,1,2) = %+v, want N 3 min 1 max 3 mean 2", got)
	}
}

func TestReplot(t *testing.T) {
	dir := t.TempDir()
	csvs := map[string][][]string{
		"files.csv": {{"config", "files", "file_size_bytes", "seconds", "mb_per_s"},
			{"local disk", "1", "1000", "0.1", "100"}, {"local disk", "10", "100", "0.2", "50"}, {"simfs local", "1", "1000", "0.5", "20"}},
		"imports.csv": {{"package", "source", "meta_latency_ms", "runs", "import_s_mean", "import_s_min", "wall_s_mean", "meta_ops"},
			{"numpy", ModeTree, "1", "1", "2", "2", "3", "5000"}, {"numpy", ModeVM, "1", "1", "2", "2", "6", "8"}},
		"coldstart.csv": {{"row", "runs", "min_s", "max_s", "mean_s", "ratio_to_container"},
			{RowContainer, "2", "4", "6", "5", "1.00"}, {RowRestore + " [TCG]", "2", "0.5", "0.7", "0.6", "0.12"}, {RowCold, "0", "", "", "", "failed: x"}},
	}
	for n, recs := range csvs {
		f, err := os.Create(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		w := csv.NewWriter(f)
		w.WriteAll(recs)
		if err := errors.Join(w.Error(), f.Close()); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Replot(dir)
	if err != nil {
		t.Fatalf("Replot: %v", err)
	}
	if len(got) != 4 {
		t.Errorf("Replot wrote %v, want 4 PNG files", got)
	}
	checkFiles(t, dir, "files.png", "imports.png", "imports-ops.png", "coldstart.png")
	if got, err := Replot(t.TempDir()); err != nil || len(got) != 0 {
		t.Errorf("Replot(empty dir) = %v, %v; want nothing, no error", got, err)
	}
}
