package build

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/build/initramfs"
	"github.com/kiln-dev/kiln/internal/build/kernel"
	"github.com/kiln-dev/kiln/internal/cache"
	"github.com/kiln-dev/kiln/internal/guest/agent"
	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/spec"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// Options tune Build. The zero value builds with defaults.
type Options struct {
	Output      string // image path; "" = <name>.kimg in the current directory
	Compression string // "" = the spec's, else lz4hc
	// Filesystem is the root filesystem: "" or "erofs" (the default), or
	// "squashfs" (zstd; for comparisons, see docs/benchmarks.md).
	Filesystem string
	Kernel     string // --kernel: a bzImage to use instead of the spec's kernel
	Modules    string // --modules: its lib/modules/<version> directory
	// KernelKind overrides the spec's kernel key: "minimal" or "debian"
	// ("" = the spec's).
	KernelKind  string
	Init        string // the kiln-init binary; "" = FindInit()
	KilnVersion string
	Log         *slog.Logger
	// Progress, when set, is called when a step starts (done false) and
	// when it ends (done true) with a short detail such as a size.
	Progress func(step string, done bool, detail string)
	// Tick, when set, gets news of a long step while it runs (the
	// compile step of kiln's kernel, on the first build on a machine).
	Tick func(step, detail string)
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
	if err := checkResources(s, vmm.HostMemoryMiB(), vmm.HostCPUs(), log); err != nil {
		return nil, err
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

	// The kernel first: kiln's own is built once per machine (minutes,
	// with its own progress steps), then it is a cache lookup.
	var k *kernel.Kernel
	kind := kernelKind(s, o)
	switch kind {
	case kernel.KindMinimal:
		if k, err = kernel.Minimal(ctx, kernel.BuildOptions{Log: log, Progress: o.Progress, Tick: o.Tick}); err != nil {
			return nil, err
		}
	case kernel.KindDebian, kernel.KindLocal:
	default:
		return nil, fmt.Errorf("unknown kernel %q: use minimal or debian", kind)
	}

	var st *Stage
	tree := filepath.Join(work, "rootfs")
	if err := step("stage rootfs", func() (string, error) {
		st, err = StageRootfs(ctx, s, StageOptions{Python: s.Python, Agent: agent.Source, Log: log}, tree)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d files, %s", st.Files, size.Format(st.TreeBytes)), nil
	}); err != nil {
		return nil, err
	}
	if len(s.Preload) > 0 {
		if err := step("check preload", func() (string, error) {
			return checkPreload(ctx, s, tree, st.PythonExe, log)
		}); err != nil {
			return nil, err
		}
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
	if err := step("kernel", func() (string, error) {
		switch {
		case o.Kernel != "" || o.Modules != "":
			if o.Kernel == "" || o.Modules == "" {
				return "", errors.New("--kernel and --modules go together: give the bzImage and its lib/modules/<version> directory")
			}
			k, err = kernel.Local(o.Kernel, o.Modules)
		case kind == kernel.KindDebian:
			k, err = kernel.Fetch(ctx, log)
		}
		if err != nil {
			return "", err
		}
		return k.Kind + " " + k.Version, nil
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
		if len(mods) == 0 {
			return "kiln-init only, " + fileSize(initrd), nil
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
		Python:      image.Python{Version: st.PythonVersion, Executable: st.PythonExe, Debian: st.Debian, Modules: st.Modules},
		Kernel:      image.Kernel{Kind: k.Kind, Version: k.Version, Package: k.Package, PackageVersion: k.PackageVersion, ConfigDigest: k.ConfigDigest},
		Rootfs:      image.Rootfs{Filesystem: fsType, Compression: comp, Files: st.Files, TreeBytes: st.TreeBytes},
		Command:     s.Command,
		Env:         s.Env,
		MemoryMiB:   s.MemoryMiB(),
		VCPUs:       s.VCPUs,
		Preload:     s.Preload,
		Agent:       []string{"/usr/bin/python3", "-u", proto.AgentPath},
		KilnVersion: o.KilnVersion,
	}
	for _, d := range st.Distributions {
		m.Distributions = append(m.Distributions, image.Distribution{Name: d.Name, Version: d.Version, Source: d.Source})
	}
	for _, mod := range mods {
		m.Kernel.Modules = append(m.Kernel.Modules, mod.Name)
	}
	kernelPart := k.Vmlinuz
	if k.Kind == kernel.KindMinimal {
		// An uncompressed vmlinux is mostly zero padding between its
		// 2 MiB-aligned segments: the image stores it gzipped, and
		// BootFiles decodes it once per image.
		kernelPart = filepath.Join(work, "kernel.gz")
		n, err := gzipFile(k.Vmlinuz, kernelPart)
		if err != nil {
			return nil, fmt.Errorf("compressing the kernel: %w", err)
		}
		m.Kernel.Encoding, m.Kernel.Size = image.KernelGzip, n
	}
	if err := step("write image", func() (string, error) {
		if dir := filepath.Dir(out); dir != "" {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return "", fmt.Errorf("creating output directory: %w", err)
			}
		}
		d, err := image.Create(out, m, []image.PartSource{
			{Name: image.PartKernel, Path: kernelPart},
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

// kernelKind is the kernel an image gets: Options.KernelKind, else the
// spec's kernel key, else spec.DefaultKernel. --kernel/--modules override
// all three (KindLocal).
func kernelKind(s *spec.Spec, o Options) string {
	switch {
	case o.Kernel != "" || o.Modules != "":
		return kernel.KindLocal
	case o.KernelKind != "":
		return o.KernelKind
	case s.Kernel != "":
		return s.Kernel
	}
	return spec.DefaultKernel
}

// checkResources refuses a spec whose memory this host cannot give a VM
// (QEMU would fail only at run time, in its own words), and warns of more
// vCPUs than the host has.
func checkResources(s *spec.Spec, hostMiB, hostCPUs int, log *slog.Logger) error {
	if mem := s.MemoryMiB(); hostMiB > 0 && mem > hostMiB {
		return fmt.Errorf("kiln.toml: key \"memory\": %s is more than this machine's %d MiB of RAM, and a VM cannot have more memory than its host: lower memory (kiln run --memory can raise it per run where there is more)", s.Memory, hostMiB)
	}
	if s.VCPUs > hostCPUs {
		log.Warn(fmt.Sprintf("kiln.toml: key \"vcpus\": %d is more than this machine's %d CPUs: VMs will run slower than with %d", s.VCPUs, hostCPUs, hostCPUs))
	}
	return nil
}

// preloadCheck imports each module named on its command line and prints
// the failures as a JSON object: module → "Type: message".
const preloadCheck = `import importlib, json, sys
errs = {}
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except BaseException as e:
        errs[m] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(errs))
`

// checkPreload imports the spec's preload modules with the image's own
// interpreter inside the staged tree (bubblewrap makes the tree the root,
// read-only, as the guest sees it), so that a misspelled or missing module
// fails the build instead of every VM. Without bubblewrap the check is
// left to snapshot creation, which fails the same way; the build says so.
func checkPreload(ctx context.Context, s *spec.Spec, tree, python string, log *slog.Logger) (string, error) {
	bwrap, err := exec.LookPath("bwrap")
	if err != nil {
		log.Warn("preload modules not checked at build (no bwrap: apt-get install bubblewrap); a snapshot of the image fails if one cannot be imported")
		return "skipped: no bwrap", nil
	}
	args := []string{"--ro-bind", tree, "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/root"}
	for _, k := range slices.Sorted(maps.Keys(s.Env)) {
		args = append(args, "--setenv", k, s.Env[k])
	}
	args = append(append(args, "--", python, "-c", preloadCheck), s.Preload...)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bwrap, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		log.Warn("preload modules not checked at build: running the image's python in bwrap failed; a snapshot of the image fails if one cannot be imported", "error", err, "stderr", tailString(stderr.String(), 500))
		return "skipped: bwrap failed", nil
	}
	var failed map[string]string
	if err := json.Unmarshal(stdout.Bytes(), &failed); err != nil {
		return "", fmt.Errorf("checking preload modules: %w (output %q)", err, tailString(stdout.String(), 500))
	}
	if len(failed) > 0 {
		var msgs []string
		for _, m := range s.Preload {
			if e, ok := failed[m]; ok {
				msgs = append(msgs, m+": "+e)
			}
		}
		return "", fmt.Errorf("kiln.toml: key \"preload\": the image cannot import %s: fix preload, or add the package that provides the module", strings.Join(msgs, "; "))
	}
	return fmt.Sprintf("%d modules import", len(s.Preload)), nil
}

// gzipFile compresses src into dst, reproducibly (no name, no time, a
// fixed level), and returns src's size.
func gzipFile(src, dst string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return 0, err
	}
	defer out.Close()
	zw, err := gzip.NewWriterLevel(out, gzip.BestCompression)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(zw, in)
	if err != nil {
		return 0, err
	}
	if err := zw.Close(); err != nil {
		return 0, err
	}
	return n, out.Close()
}

func fileSize(p string) string {
	fi, err := os.Stat(p)
	if err != nil {
		return ""
	}
	return size.Format(fi.Size())
}
