package main

// Benchmarks of build and boot, one operation per b.Loop iteration. The
// side-by-side table of root filesystems and boot phases is the kiln bench
// boot experiment. Run these with, for example:
//
//	go test -run '^$' -bench . -benchtime 3x -timeout 60m ./cmd/kiln/

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/kiln-dev/kiln/internal/build"
	"github.com/kiln-dev/kiln/internal/spec"
	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
	"github.com/kiln-dev/kiln/internal/vm"
)

func benchSpec(b *testing.B) *spec.Spec {
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "kiln.toml"), []byte(testimage.NumpySpec), 0o644); err != nil {
		b.Fatal(err)
	}
	s, err := spec.Load(dir)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// BenchmarkBuild builds the numpy image: with an empty cache (downloads the
// kernel and python3-numpy's packages) and with the cache warm.
func BenchmarkBuild(b *testing.B) {
	testutil.NeedTool(b, "mkfs.erofs", "erofs-utils")
	testutil.NeedNetwork(b)
	s := benchSpec(b)
	initBin := testutil.KilnInit(b)
	build1 := func(b *testing.B) *build.Result {
		res, err := build.Build(context.Background(), s, build.Options{Output: filepath.Join(b.TempDir(), "numpy.kimg"), Init: initBin})
		if err != nil {
			b.Fatal(err)
		}
		return res
	}
	b.Run("cold-cache", func(b *testing.B) {
		var res *build.Result
		for b.Loop() {
			b.StopTimer()
			b.Setenv("KILN_CACHE", b.TempDir())
			b.StartTimer()
			res = build1(b)
		}
		b.ReportMetric(float64(res.Size)/(1<<20), "image-MiB")
	})
	b.Run("warm-cache", func(b *testing.B) {
		b.Setenv("KILN_CACHE", b.TempDir())
		res := build1(b)
		for b.Loop() {
			res = build1(b)
		}
		b.ReportMetric(float64(res.Size)/(1<<20), "image-MiB")
	})
}

// BenchmarkBootImport cold-boots the numpy image, built with each root
// filesystem, to run `import numpy`, and reports the in-guest import time
// and when kiln-init started.
func BenchmarkBootImport(b *testing.B) {
	testutil.NeedQEMU(b)
	s := benchSpec(b)
	initBin := testutil.KilnInit(b)
	code := "import time; t = time.perf_counter(); import numpy; print(time.perf_counter() - t)"
	for _, v := range []struct {
		name string
		o    build.Options
	}{
		{"erofs-lz4hc", build.Options{Compression: "lz4hc"}},
		{"erofs-none", build.Options{Compression: "none"}},
		{"squashfs-zstd", build.Options{Filesystem: "squashfs"}},
	} {
		b.Run(v.name, func(b *testing.B) {
			o := v.o
			o.Init, o.Output = initBin, filepath.Join(b.TempDir(), "img.kimg")
			res, err := build.Build(context.Background(), s, o)
			if err != nil {
				b.Fatal(err)
			}
			img := testutil.OpenImage(b, res.Path)
			var importS, initS float64
			for b.Loop() {
				var out, errb bytes.Buffer
				m, err := vm.New(vm.Config{Image: img}, vm.WithCommand([]string{"python3", "-c", code}, nil, vm.Stdio{Stdout: &out, Stderr: &errb}))
				if err != nil {
					b.Fatal(err)
				}
				if err := m.Start(context.Background()); err != nil {
					b.Fatal(err)
				}
				exit, err := m.Wait(context.Background())
				m.Close()
				if err != nil || exit.Code != 0 {
					b.Fatalf("%s: %v %+v %s", v.name, err, exit, errb.String())
				}
				sec, err := strconv.ParseFloat(strings.TrimSpace(out.String()), 64)
				if err != nil {
					b.Fatalf("%s: output %q", v.name, out.String())
				}
				importS += sec
				initS += m.Timings().InitStarted.Seconds()
			}
			b.ReportMetric(importS/float64(b.N), "import-s")
			b.ReportMetric(initS/float64(b.N), "init-s")
			b.ReportMetric(float64(res.Size)/(1<<20), "image-MiB")
		})
	}
}
