package build

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"

	"github.com/kiln-dev/kiln/guest/agent"
	"github.com/kiln-dev/kiln/internal/cache"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/initramfs"
	"github.com/kiln-dev/kiln/internal/kernel"
	"github.com/kiln-dev/kiln/internal/spec"
)

// AgentPath is where the agent lives in every image.
const AgentPath = "/usr/lib/kiln/agent.py"

// Options tune Build. The zero value builds with defaults.
type Options struct {
	Output      string // image path; "" = <name>.kimg in the current directory
	Compression string // "" = the spec's, else lz4hc
	// Filesystem is the root filesystem: "" or "erofs" (the default), or
	// "squashfs" (zstd; for comparisons, see docs/BENCHMARKS.md).
	Filesystem  string
	Kernel      string // --kernel: a bzImage to use instead of Debian's cloud kernel
	Modules     string // --modules: its lib/modules/<version> directory
	Init        string // the kiln-init binary; "" = FindInit()
	KilnVersion string
	Log         *slog.Logger
	// Progress, when set, is called when a step starts (done false) and
	// when it ends (done true) with a short detail such as a size.
	Progress func(step string, done bool, detail string)
}

// Result describes a built image.
type Result struct {
	Path     string          `json:"path"`
	Digest   string          `json:"digest"`
	Size     int64           `json:"size"`
	Manifest *image.Manifest `json:"manifest"`
	Steps    []Step          `json:"steps"`
}

// Step is one timed build step.
type Step struct {
	Name    string        `json:"name"`
	Elapsed time.Duration `json:"elapsed_ns"`
	Detail  string        `json:"detail,omitempty"`
}

// CheckHost reports whether kiln can build images on a host of this OS and
// architecture: images hold the host's own Python and libraries, and their
// guest is x86_64 Linux.
func CheckHost(goos, goarch string) error {
	if goos != "linux" || goarch != "amd64" {
		return fmt.Errorf("unsupported host %s/%s: kiln builds x86_64 Linux images from the host's own x86_64 Python; run kiln build on an x86_64 (amd64) Linux host", goos, goarch)
	}
	return nil
}

// FindInit locates the kiln-init binary: $KILN_INIT, then kiln-init next to
// the running executable.
func FindInit() (string, error) {
	if p := os.Getenv("KILN_INIT"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("KILN_INIT=%s: %w", p, err)
		}
		return p, nil
	}
	exe, err := os.Executable()
	if err == nil {
		p := filepath.Join(filepath.Dir(exe), "kiln-init")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("kiln-init not found next to the kiln binary: build both with `make` (bin/kiln, bin/kiln-init) or set KILN_INIT to the static kiln-init binary")
}

// Build turns a spec into one image file. Temporary files are removed on
// every path; the image appears atomically at o.Output.
func Build(ctx context.Context, s *spec.Spec, o Options) (*Result, error) {
	if err := CheckHost(runtime.GOOS, runtime.GOARCH); err != nil {
		return nil, err
	}
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if _, err := exec.LookPath("mkfs.erofs"); err != nil {
		return nil, errors.New("mkfs.erofs not found: install erofs-utils (apt-get install erofs-utils)")
	}
	initPath := o.Init
	if initPath == "" {
		p, err := FindInit()
		if err != nil {
			return nil, err
		}
		initPath = p
	}
	out := o.Output
	if out == "" {
		out = s.Name + ".kimg"
	}
	comp := o.Compression
	if comp == "" {
		comp = s.Compression
	}
	if comp == "" {
		comp = "lz4hc"
	}
	switch comp {
	case "none", "lz4", "lz4hc":
	default:
		return nil, fmt.Errorf("unknown compression %q: use none, lz4 or lz4hc", comp)
	}

	tmpRoot, err := cache.Sub("tmp")
	if err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(tmpRoot, "build-")
	if err != nil {
		return nil, fmt.Errorf("creating build directory: %w", err)
	}
	defer os.RemoveAll(work)

	res := &Result{Path: out}
	step := func(name string, fn func() (string, error)) error {
		if o.Progress != nil {
			o.Progress(name, false, "")
		}
		t0 := time.Now()
		detail, err := fn()
		res.Steps = append(res.Steps, Step{Name: name, Elapsed: time.Since(t0), Detail: detail})
		if o.Progress != nil && err == nil {
			o.Progress(name, true, detail)
		}
		log.Debug("build step", "step", name, "elapsed", time.Since(t0), "detail", detail)
		if err != nil {
			return err
		}
		return ctx.Err()
	}

	var st *Stage
	tree := filepath.Join(work, "rootfs")
	if err := step("stage rootfs", func() (string, error) {
		st, err = StageRootfs(ctx, s, StageOptions{Python: s.Python, Agent: agent.Source, Log: log}, tree)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d files, %s", st.Files, Size(st.TreeBytes)), nil
	}); err != nil {
		return nil, err
	}
	rootfs := filepath.Join(work, "rootfs.img")
	fsType := "erofs"
	switch o.Filesystem {
	case "", "erofs":
	case "squashfs":
		fsType, comp = "squashfs", "zstd"
	default:
		return nil, fmt.Errorf("unknown root filesystem %q: use erofs or squashfs", o.Filesystem)
	}
	if err := step("make "+fsType+" ("+comp+")", func() (string, error) {
		var err error
		if fsType == "squashfs" {
			err = MkSquashfs(ctx, tree, rootfs)
		} else {
			err = MkErofs(ctx, tree, rootfs, comp)
		}
		if err != nil {
			return "", err
		}
		return fileSize(rootfs), nil
	}); err != nil {
		return nil, err
	}
	var k *kernel.Kernel
	if err := step("kernel", func() (string, error) {
		if o.Kernel != "" || o.Modules != "" {
			if o.Kernel == "" || o.Modules == "" {
				return "", errors.New("--kernel and --modules go together: give the bzImage and its lib/modules/<version> directory")
			}
			k, err = kernel.Local(o.Kernel, o.Modules)
		} else {
			k, err = kernel.Fetch(ctx, log)
		}
		if err != nil {
			return "", err
		}
		return k.Version, nil
	}); err != nil {
		return nil, err
	}
	initrd := filepath.Join(work, "initramfs.cpio")
	var mods []kernel.Module
	if err := step("initramfs", func() (string, error) {
		mods, err = k.ModuleClosure(kernel.DefaultModules)
		if err != nil {
			return "", err
		}
		f, err := os.Create(initrd)
		if err != nil {
			return "", err
		}
		defer f.Close()
		if err := initramfs.Write(f, initramfs.ForInit(initPath, mods)); err != nil {
			return "", fmt.Errorf("writing initramfs: %w", err)
		}
		if err := f.Close(); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d modules, %s", len(mods), fileSize(initrd)), nil
	}); err != nil {
		return nil, err
	}

	// The manifest records the spec without host paths, so builds from
	// different checkouts give the same bytes.
	ms := *s
	if ms.RequirementsFile != "" {
		if rel, err := filepath.Rel(s.Dir, ms.RequirementsFile); err == nil {
			ms.RequirementsFile = rel
		}
	}
	m := &image.Manifest{
		Format:      image.FormatVersion,
		Name:        s.Name,
		Spec:        &ms,
		Python:      image.Python{Version: st.PythonVersion, Executable: st.PythonExe, Debian: st.Debian},
		Kernel:      image.Kernel{Version: k.Version, Package: k.Package, PackageVersion: k.PackageVersion},
		Rootfs:      image.Rootfs{Filesystem: fsType, Compression: comp, Files: st.Files, TreeBytes: st.TreeBytes},
		Command:     s.Command,
		Env:         s.Env,
		MemoryMiB:   s.MemoryMiB(),
		VCPUs:       s.VCPUs,
		Preload:     s.Preload,
		Agent:       []string{"/usr/bin/python3", "-u", AgentPath},
		KilnVersion: o.KilnVersion,
	}
	for _, d := range st.Distributions {
		m.Distributions = append(m.Distributions, image.Distribution{Name: d.Name, Version: d.Version, Source: d.Source})
	}
	for _, mod := range mods {
		m.Kernel.Modules = append(m.Kernel.Modules, mod.Name)
	}
	if err := step("write image", func() (string, error) {
		if dir := filepath.Dir(out); dir != "" {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return "", fmt.Errorf("creating output directory: %w", err)
			}
		}
		d, err := image.Create(out, m, []image.PartSource{
			{Name: image.PartKernel, Path: k.Vmlinuz},
			{Name: image.PartInitramfs, Path: initrd},
			{Name: image.PartRootfs, Path: rootfs},
		})
		if err != nil {
			return "", err
		}
		res.Digest = d
		return fileSize(out), nil
	}); err != nil {
		return nil, err
	}
	fi, err := os.Stat(out)
	if err != nil {
		return nil, err
	}
	res.Size = fi.Size()
	res.Manifest = m
	return res, nil
}

func fileSize(p string) string {
	fi, err := os.Stat(p)
	if err != nil {
		return ""
	}
	return Size(fi.Size())
}

// Size formats a byte count for people (binary units).
func Size(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
