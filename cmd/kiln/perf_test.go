package main

// Benchmarks for docs/BENCHMARKS.md (build and boot). Each prints its table;
// rows compared with each other are measured in one run, interleaved. Run:
//
//	go test -run '^$' -bench . -benchtime 1x -timeout 60m ./cmd/kiln/

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/build"
	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/launch"
	"github.com/kiln-dev/kiln/internal/spec"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/vmm"
)

func benchSpec(b *testing.B) *spec.Spec {
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "kiln.toml"), []byte(testutil.NumpySpec), 0o644); err != nil {
		b.Fatal(err)
	}
	s, err := spec.Load(dir)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// BenchmarkBuild builds the numpy image with an empty cache (downloads the
// kernel and python3-numpy's packages) and again with the cache warm.
func BenchmarkBuild(b *testing.B) {
	s := benchSpec(b)
	initBin := testutil.KilnInit(b)
	b.Setenv("KILN_CACHE", b.TempDir())
	for _, name := range []string{"cold cache", "warm cache"} {
		out := filepath.Join(b.TempDir(), "numpy.kimg")
		t0 := time.Now()
		res, err := build.Build(context.Background(), s, build.Options{Output: out, Init: initBin})
		if err != nil {
			b.Fatal(err)
		}
		benchf("build, %s: %.1f s, image %s (rootfs tree %s, %d files)", name, time.Since(t0).Seconds(), build.Size(res.Size), build.Size(res.Manifest.Rootfs.TreeBytes), res.Manifest.Rootfs.Files)
		for _, st := range res.Steps {
			benchf("    %-22s %6.2f s  %s", st.Name, st.Elapsed.Seconds(), st.Detail)
		}
	}
}

// BenchmarkBootAndImport boots the numpy image built with three root
// filesystems, interleaved, and reports the boot phases and the in-guest
// time of `import numpy`.
func BenchmarkBootAndImport(b *testing.B) {
	s := benchSpec(b)
	initBin := testutil.KilnInit(b)
	variants := []struct {
		name string
		o    build.Options
	}{
		{"erofs lz4hc", build.Options{Compression: "lz4hc"}},
		{"erofs none", build.Options{Compression: "none"}},
		{"squashfs zstd-19", build.Options{Filesystem: "squashfs"}},
	}
	imgs := map[string]string{}
	for _, v := range variants {
		o := v.o
		o.Init = initBin
		o.Output = filepath.Join(b.TempDir(), "img.kimg")
		res, err := build.Build(context.Background(), s, o)
		if err != nil {
			b.Fatal(err)
		}
		imgs[v.name] = res.Path
		benchf("%-17s image %s", v.name, build.Size(res.Size))
	}
	runs := 5
	if v, err := strconv.Atoi(os.Getenv("KILN_BENCH_RUNS")); err == nil && v > 0 {
		runs = v
	}
	acc, _ := vmm.DetectAccel()
	imports := map[string][]float64{}
	phases := map[string][]time.Duration{}
	var order []string
	code := "import time; t = time.perf_counter(); import numpy; print(time.perf_counter() - t)"
	for i := 0; i < runs; i++ {
		for _, v := range variants {
			img, err := launch.Open(imgs[v.name])
			if err != nil {
				b.Fatal(err)
			}
			vm, err := launch.Boot(context.Background(), img, proto.RunConfig{Mode: proto.ModeRun, Argv: []string{"python3", "-c", code}, Env: img.Manifest.Env}, launch.Options{Accel: acc})
			if err != nil {
				b.Fatal(err)
			}
			var out, errb bytes.Buffer
			exit, err := vm.RunCommand(context.Background(), &out, &errb)
			vm.Close()
			if err != nil || exit.Code != 0 {
				b.Fatalf("%s: %v %+v %s", v.name, err, exit, errb.String())
			}
			sec, err := strconv.ParseFloat(strings.TrimSpace(out.String()), 64)
			if err != nil {
				b.Fatalf("%s: output %q", v.name, out.String())
			}
			imports[v.name] = append(imports[v.name], sec)
			if v.name == "erofs lz4hc" {
				for _, p := range vm.Timings.Phases() {
					if _, ok := phases[p.Name]; !ok {
						order = append(order, p.Name)
					}
					phases[p.Name] = append(phases[p.Name], p.Since)
				}
			}
		}
	}
	benchf("accel %s; %d runs per row, interleaved", acc, runs)
	benchf("| root filesystem | import numpy in the guest, median s | min | max |")
	for _, v := range variants {
		x := slices.Clone(imports[v.name])
		slices.Sort(x)
		benchf("| %s | %.3f | %.3f | %.3f |", v.name, x[len(x)/2], x[0], x[len(x)-1])
	}
	benchf("boot phases (erofs lz4hc), median seconds since kiln started QEMU:")
	for _, name := range order {
		d := slices.Clone(phases[name])
		slices.Sort(d)
		benchf("    %-16s %.3f", name, d[len(d)/2].Seconds())
	}
}

// benchf prints a line of a benchmark's report to stdout (b.Logf output of
// benchmarks is cut after a few lines).
func benchf(format string, args ...any) {
	fmt.Printf(format+"\n", args...)
}
