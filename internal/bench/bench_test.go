package bench

import (
	"context"
	"encoding/csv"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
	"github.com/kiln-dev/kiln/internal/vmm"
)

func TestMain(m *testing.M) { testutil.Main(m) }

// quickOptions runs in temporary directories, with the test kiln-init.
func quickOptions(t *testing.T) Options {
	t.Helper()
	testutil.NeedQEMU(t)
	testutil.NeedRoot(t) // FUSE mounts with allow_other, loop mounts
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
	o.Images = map[string]string{"numpy": testimage.Numpy(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	t.Cleanup(func() { noSimMounts(t) })
	reps, err := All(ctx, o)
	if err != nil {
		t.Fatalf("All: %v", err)
	}
	if len(reps) != len(Experiments) {
		t.Fatalf("All returned %d reports, want %d", len(reps), len(Experiments))
	}
	checkFiles(t, o.Out, "files.csv", "files.md", "files.png", "imports.csv", "imports.md", "imports.png", "imports-ops.png",
		"coldstart.csv", "coldstart.md", "coldstart.png", "boot.csv", "boot.md", "boot.png", "invoke.csv", "invoke.md")

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
	checkBoot(t, o.Out, "1")
	checkInvoke(t, o.Out)
}

// positive checks that the named cells of a CSV row are positive numbers.
func positive(t *testing.T, file string, r map[string]string, cols ...string) {
	t.Helper()
	for _, c := range cols {
		v, err := strconv.ParseFloat(r[c], 64)
		if err != nil || !(v > 0) {
			t.Errorf("%s row %q: %s = %q, want a positive number", file, r["row"]+r["variant"], c, r[c])
		}
	}
}

// checkEnv checks that a report's Markdown records the machine and the accelerator.
func checkEnv(t *testing.T, path string) {
	t.Helper()
	md, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kernel:", "accelerator", "CPU:"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("%s lacks %q (the environment must be recorded)", path, want)
		}
	}
}

// checkBoot checks the boot report's shape: one row per variant with
// runs boots, a size, every phase and the import time.
func checkBoot(t *testing.T, dir, runs string) {
	t.Helper()
	rows := readCSV(t, filepath.Join(dir, "boot.csv"))
	want := len(BootVariants)
	if acc, _ := vmm.DetectAccel(); acc != vmm.KVM {
		want += len(bootKVMRows) // listed for KVM, not measured
	}
	if len(rows) != want {
		t.Fatalf("boot.csv has %d rows, want %d", len(rows), want)
	}
	for _, r := range rows[len(BootVariants):] {
		if r["accel"] != "KVM" || r["runs"] != "0" || !strings.Contains(r["note"], "not measured") || r["init_started_s"] != "" {
			t.Errorf("boot.csv KVM row %q = %v, want it listed with no measurements", r["variant"], r)
		}
	}
	rows = rows[:len(BootVariants)]
	for i, r := range rows {
		if r["variant"] != BootVariants[i].Name || r["runs"] != runs {
			t.Errorf("boot.csv row %d: variant %q, runs %q; want %q, %s", i, r["variant"], r["runs"], BootVariants[i].Name, runs)
		}
		cols := []string{"image_mib", "memory_mib", "vcpus", "import_s_median", "import_s_min", "import_s_max", "cold_first_result_s", "restore_first_result_s"}
		for _, p := range bootPhases {
			cols = append(cols, p+"_s")
		}
		positive(t, "boot.csv", r, cols...)
		if r["kernel"] == "" || r["rootfs"] == "" {
			t.Errorf("boot.csv row %q: kernel %q, rootfs %q; want both", r["variant"], r["kernel"], r["rootfs"])
		}
	}
	if want := []string{"erofs lz4hc", "erofs lz4hc", "erofs lz4hc", "erofs none", "squashfs zstd"}; len(rows) == len(want) {
		for i, w := range want {
			if rows[i]["rootfs"] != w {
				t.Errorf("boot.csv row %q: rootfs %q, want %q", rows[i]["variant"], rows[i]["rootfs"], w)
			}
		}
	}
	checkEnv(t, filepath.Join(dir, "boot.md"))
}

// checkInvoke checks the invoke report's shape: every row, with positive
// numbers where the row has them.
func checkInvoke(t *testing.T, dir string) {
	t.Helper()
	rows := readCSV(t, filepath.Join(dir, "invoke.csv"))
	byName := map[string]map[string]string{}
	for _, r := range rows {
		byName[strings.TrimSuffix(r["row"], " [TCG]")] = r
	}
	all := []string{"n", "min", "p50", "p90", "max", "mean"}
	for _, c := range []struct {
		row  string
		cols []string
	}{
		{RowWarmNoop, all}, {RowWarmNumpy, all}, {RowProcNoop, all}, {RowProcNumpy, all},
		{RowHostNoop, []string{"n", "p50"}}, {RowHostNumpy, []string{"n", "p50"}},
		{RowColdPSS, all}, {RowClonePSS, all}, {RowPSSRatio, all},
	} {
		r, ok := byName[c.row]
		if !ok {
			t.Errorf("invoke.csv has no row %q; rows: %v", c.row, rows)
			continue
		}
		positive(t, "invoke.csv", r, c.cols...)
	}
	if len(rows) != 9 {
		t.Errorf("invoke.csv has %d rows, want 9", len(rows))
	}
	if n := byName[RowWarmNoop]["n"]; n != "10" {
		t.Errorf("invoke.csv %q: n = %q, want 10 (--quick)", RowWarmNoop, n)
	}
	if n := byName[RowClonePSS]["n"]; n != "2" {
		t.Errorf("invoke.csv %q: n = %q, want 2 clones (--quick)", RowClonePSS, n)
	}
	checkEnv(t, filepath.Join(dir, "invoke.md"))
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

func TestQuantile(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3}
	for _, tt := range []struct{ q, want float64 }{{0, 1}, {0.5, 3}, {0.9, 4.6}, {1, 5}} {
		if got := quantile(xs, tt.q); math.Abs(got-tt.want) > 1e-9 {
			t.Errorf("quantile(%v, %v) = %v, want %v", xs, tt.q, got, tt.want)
		}
	}
	if xs[0] != 5 {
		t.Errorf("quantile sorted its argument: %v", xs)
	}
	if got := median([]float64{2, 1}); got != 1.5 {
		t.Errorf("median(2, 1) = %v, want 1.5", got)
	}
	if got := median([]float64{7}); got != 7 {
		t.Errorf("median(7) = %v, want 7", got)
	}
	if got := quantile(nil, 0.5); got != 0 {
		t.Errorf("quantile(nil) = %v, want 0", got)
	}
}

func TestSig(t *testing.T) {
	for x, want := range map[float64]string{1234.5: "1234", 12.3456: "12.35", 0.123456: "0.1235", 0.0000912: "0.00009120", 52000: "52000"} {
		if got := sig(x); got != want {
			t.Errorf("sig(%v) = %q, want %q", x, got, want)
		}
	}
}

func TestParseSeconds(t *testing.T) {
	for _, tt := range []struct {
		out  string
		want float64
		ok   bool
	}{
		{"2.25\n", 2.25, true},
		{"a warning\n0.5\n\n", 0.5, true},
		{"Traceback …\n", 0, false},
		{"", 0, false},
		{"-1\n", 0, false},
	} {
		got, err := parseSeconds(tt.out)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseSeconds(%q) = %v, %v; want %v, ok %v", tt.out, got, err, tt.want, tt.ok)
		}
	}
}

func TestProcKB(t *testing.T) {
	p := filepath.Join(t.TempDir(), "smaps_rollup")
	if err := os.WriteFile(p, []byte("Rss:    2048 kB\nPss:     1536 kB\nPss_Anon: 10 kB\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := procKB(p, "Pss"); err != nil || got != 1536 {
		t.Errorf("procKB(Pss) = %v, %v; want 1536", got, err)
	}
	if _, err := procKB(p, "Swap"); err == nil {
		t.Error("procKB(Swap) succeeded on a file without it")
	}
	if kb, err := procKB("/proc/self/smaps_rollup", "Pss"); err != nil || kb <= 0 {
		t.Errorf("procKB(/proc/self/smaps_rollup, Pss) = %v, %v; want a positive size", kb, err)
	}
}

func TestBootNoVM(t *testing.T) {
	if !vmOnly["boot"] || vmOnly["invoke"] {
		t.Errorf("vmOnly = %v: want boot (every row boots a VM), not invoke (its host rows run without VMs)", vmOnly)
	}
	if _, err := Boot(context.Background(), Options{NoVM: true, Out: t.TempDir(), Work: t.TempDir()}); err == nil {
		t.Error("Boot with NoVM succeeded, want an error")
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
		"boot.csv": {bootColumns(),
			{"minimal-microvm", "TCG", "erofs lz4hc", "minimal 6.1.192", "microvm", "qemu", "512", "1", "2", "52.6", "0.1", "0.4", "0.7", "0.8", "0.8", "3.0", "2.2", "1.9", "2.6", "4.1", "0.5", ""},
			{"debian-q35", "TCG", "erofs lz4hc", "debian 6.1.0-57-cloud-amd64", "q35", "qemu", "512", "1", "2", "60.6", "0.19", "0.6", "2.6", "2.7", "2.8", "5.8", "2.2", "1.9", "2.6", "6.1", "0.6", ""},
			{"squashfs-zstd", "TCG", "", "", "", "qemu", "", "", "0", "", "", "", "", "", "", "", "", "", "", "", "", "failed: x"},
			{"minimal-microvm", "KVM", "erofs lz4hc", "minimal 6.1.192", "microvm", "qemu", "512", "1", "0", "52.6", "", "", "", "", "", "", "", "", "", "", "", "not measured: no KVM"}},
		// invoke has no plot: Replot must skip its CSV.
		"invoke.csv": {{"row", "unit", "n", "min", "p50", "p90", "max", "mean"}, {RowWarmNoop, "ms", "10", "2", "5", "7", "14", "6"}},
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
	if len(got) != 5 {
		t.Errorf("Replot wrote %v, want 5 PNG files", got)
	}
	checkFiles(t, dir, "files.png", "imports.png", "imports-ops.png", "coldstart.png", "boot.png")
	if got, err := Replot(t.TempDir()); err != nil || len(got) != 0 {
		t.Errorf("Replot(empty dir) = %v, %v; want nothing, no error", got, err)
	}
}

func TestClean(t *testing.T) {
	work := t.TempDir()
	if err := os.MkdirAll(filepath.Join(work, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(work, "images", "x.kimg"), make([]byte, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	dir, freed, err := Clean(work)
	if err != nil || dir != work || freed != 1000 {
		t.Fatalf("Clean(%s) = %s, %d, %v; want %s, 1000, nil", work, dir, freed, err, work)
	}
	if ents, _ := os.ReadDir(work); len(ents) != 0 {
		t.Errorf("after Clean %s holds %d entries, want none", work, len(ents))
	}
}
