package bench

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/build"
	"github.com/kiln-dev/kiln/internal/guest/agent"
	"github.com/kiln-dev/kiln/internal/guest/task"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/sandbox"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/vm"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// BootVariant is one way of building and booting the bench's numpy image:
// one row of the boot experiment. A kernel variant sets Build.KernelKind
// (or Build.Kernel and Build.Modules); a machine variant sets Machine,
// VMM, MemoryMiB or VCPUs.
type BootVariant struct {
	Name      string        // row label, unique; part of the cached image's file name
	Build     build.Options // Output, Init and Log are set by the experiment
	Machine   string        // machine type ("": the image's, vm.MachineFor)
	VMM       string        // VMM driver ("": vmm.DefaultDriver)
	MemoryMiB int           // 0: the image's
	VCPUs     int           // 0: the image's
}

// BootVariants are the boot experiment's rows, in table order: kiln's
// defaults first (the minimal kernel on a microvm, erofs lz4hc), then the
// same kernel on q35 (the machine's share), Debian's cloud kernel on q35
// (the kernel's share, and kiln before it had its own), and the other root
// filesystems.
var BootVariants = []BootVariant{
	{Name: "minimal-microvm", Build: build.Options{KernelKind: "minimal", Compression: "lz4hc"}, Machine: vmm.MachineMicrovm},
	{Name: "minimal-q35", Build: build.Options{KernelKind: "minimal", Compression: "lz4hc"}, Machine: vmm.MachineQ35},
	{Name: "debian-q35", Build: build.Options{KernelKind: "debian", Compression: "lz4hc"}, Machine: vmm.MachineQ35},
	{Name: "erofs-none", Build: build.Options{KernelKind: "minimal", Compression: "none"}},
	{Name: "squashfs-zstd", Build: build.Options{KernelKind: "minimal", Filesystem: "squashfs"}},
}

// bootKVMRows are the variants that get a row for the accelerator the run
// does not have (KVM on a machine without it): listed, not measured.
var bootKVMRows = []string{"minimal-microvm", "minimal-q35", "debian-q35"}

// bootScript is the boot experiment's run-mode command: it prints the
// seconds `import numpy` took inside the guest.
const bootScript = "import time; t = time.perf_counter(); import numpy; print(time.perf_counter() - t)"

// bootPhases are the vm.Timings phases of a run-mode boot, in order; each
// is a column <name>_s of the boot report.
var bootPhases = []string{"vmm_started", "kernel_started", "init_started", "rootfs_mounted", "command_started", "command_exited"}

type bootRow struct {
	v       BootVariant
	path    string
	given   bool // the image came from Options.Images
	img     *image.Image
	phases  map[string][]float64 // seconds since Start, per phase
	imports []float64
	cold    []float64 // sandbox cold boot → first result, seconds
	restore []float64 // sandbox snapshot restore → first result, seconds
	err     error
}

// Boot builds the bench's numpy image with each of BootVariants and, Runs
// times (default 5, 1 with Quick), interleaved, measures every variant
// three ways: a cold boot in run mode (the boot phases and the in-guest
// time of `import numpy`), a sandbox cold boot to the first result of a
// numpy job, and a sandbox snapshot restore to the same result. It reports
// the image size, the medians, and rows for KVM left empty when the
// machine has no KVM. The images are built on the local disk under
// Options.Work and need neither the filesystem model nor root.
func Boot(ctx context.Context, o Options) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	if o.NoVM {
		return nil, errNoVM("boot")
	}
	runs := 5
	if o.Quick {
		runs = 1
	}
	if o.Runs > 0 {
		runs = o.Runs
	}
	var rows []*bootRow
	for _, v := range BootVariants {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		r := &bootRow{v: v, phases: map[string][]float64{}}
		rows = append(rows, r)
		var err error
		if r.path, r.given, err = localImage(ctx, &o, "numpy", v.Name, v.Build); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			r.err = fmt.Errorf("building the boot variant %s: %w", v.Name, err)
			o.progress("[boot] %s: %v", v.Name, r.err)
			continue
		}
		if r.img, err = openWarm(r.path); err != nil {
			r.err = fmt.Errorf("opening the boot variant %s: %w", v.Name, err)
			o.progress("[boot] %s: %v", v.Name, r.err)
			continue
		}
		o.progress("[boot] %s: creating the snapshot for its restore column (not measured)", v.Name)
		if _, err := bootInvoke(ctx, &o, r, sandbox.SnapshotAuto); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			r.err = fmt.Errorf("creating the snapshot of the boot variant %s: %w", v.Name, err)
			o.progress("[boot] %s: %v", v.Name, r.err)
		}
	}
	for i := 0; i < runs; i++ {
		for _, r := range rows {
			if r.err != nil {
				continue
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			t, imp, err := bootOnce(ctx, &o, r)
			if err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				r.err = fmt.Errorf("booting the boot variant %s: %w", r.v.Name, err)
				o.progress("[boot] run %d/%d %-14s FAILED: %v", i+1, runs, r.v.Name, err)
				continue
			}
			cold, err := bootInvoke(ctx, &o, r, sandbox.SnapshotOff)
			if err == nil {
				var restore float64
				if restore, err = bootInvoke(ctx, &o, r, sandbox.SnapshotUse); err == nil {
					r.cold = append(r.cold, cold)
					r.restore = append(r.restore, restore)
				}
			}
			if err != nil {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				r.err = fmt.Errorf("invoking the boot variant %s: %w", r.v.Name, err)
				o.progress("[boot] run %d/%d %-15s FAILED: %v", i+1, runs, r.v.Name, err)
				continue
			}
			for _, p := range t.Phases() {
				r.phases[p.Name] = append(r.phases[p.Name], p.Since.Seconds())
			}
			r.imports = append(r.imports, imp)
			o.progress("[boot] run %d/%d %-15s init %6.2fs, command exited %6.2fs, import numpy %6.3fs, cold first result %6.2fs, restore first result %6.3fs", i+1, runs, r.v.Name,
				t.InitStarted.Seconds(), t.CommandExited.Seconds(), imp, r.cold[len(r.cold)-1], r.restore[len(r.restore)-1])
		}
	}
	rep := &Report{
		Name:    "boot",
		Title:   "Boot of the numpy image by kernel, machine and root filesystem: boot phases, `import numpy`, first result cold and restored",
		Env:     DetectEnv(o.Accel, o.Quick),
		Columns: bootColumns(),
	}
	for _, r := range rows {
		rep.Rows = append(rep.Rows, r.row(&o))
		if r.err != nil && len(r.imports) > 0 {
			rep.Notes = append(rep.Notes, fmt.Sprintf("%s: %d of %d runs failed, the last with: %v", r.v.Name, runs-len(r.imports), runs, r.err))
		}
	}
	if o.Accel != vmm.KVM {
		for _, name := range bootKVMRows {
			for _, r := range rows {
				if r.v.Name == name {
					rep.Rows = append(rep.Rows, r.emptyRow(&o, vmm.KVM, "not measured: this machine has no usable /dev/kvm"))
				}
			}
		}
	}
	rep.Notes = append(rep.Notes,
		fmt.Sprintf("Rows were interleaved: %d round(s), each cold-booting every variant once, in table order, to run `python3 -c %q` in run mode.", runs, bootScript),
		"Phase columns are medians, in seconds since the VM's Start (before the VMM process), as the host observed them (vm.Timings); kernel_started is estimated from the guest uptime kiln-init reports when it starts, so vmm_started → kernel_started is the firmware and the kernel's loading (and, for a bzImage, its decompression) and kernel_started → init_started the kernel's own boot. import_s is the `import numpy` statement alone, timed inside the guest by Python.",
		fmt.Sprintf("cold_first_result_s and restore_first_result_s are medians of the wall time of sandbox.Start plus one Invoke of a numpy job (`%s`), from a cold boot (no snapshot) and from the variant's snapshot (created once before the rounds, numpy preloaded).", strings.ReplaceAll(jobSource, "\n", " ")),
		"Every image is built from the bench's numpy spec (internal/bench/specs/numpy.toml) onto the local disk under the work directory (no filesystem model) and read once before the rounds, so every boot reads it from the page cache. image_mib is the whole image file: kernel, initramfs and root filesystem.")
	for _, r := range rows {
		if r.given {
			rep.Notes = append(rep.Notes, fmt.Sprintf("%s used the given image %s (Options.Images[numpy]: its root filesystem and compression match the variant) instead of building one.", r.v.Name, r.path))
		}
	}
	if o.Accel != vmm.KVM {
		rep.Notes = append(rep.Notes, "Every row ran under QEMU's TCG emulator because this machine has no usable /dev/kvm: the guest kernel and Python execute emulated, roughly 10–15× slower than under KVM. The rows compare with each other, not with a host.")
	}
	if err := rep.write(o.Out); err != nil {
		return nil, err
	}
	pngs, err := plotBoot(rep, o.Out)
	if err != nil {
		return nil, err
	}
	rep.Files = append(rep.Files, pngs...)
	return rep, nil
}

func bootColumns() []string {
	cols := []string{"variant", "accel", "rootfs", "kernel", "machine", "vmm", "memory_mib", "vcpus", "runs", "image_mib"}
	for _, p := range bootPhases {
		cols = append(cols, p+"_s")
	}
	return append(cols, "import_s_median", "import_s_min", "import_s_max", "cold_first_result_s", "restore_first_result_s", "note")
}

// head renders the columns before the measurements: what the variant is.
func (r *bootRow) head(o *Options, accel vmm.Accel, runs int) []string {
	rootfs, kernel, machine, mem, cpus, mib := "", "", r.v.Machine, "", "", ""
	if r.img != nil {
		m := r.img.Manifest
		rootfs = m.Rootfs.Filesystem + " " + m.Rootfs.Compression
		kernel = m.KernelKind() + " " + m.Kernel.Version
		cfg := vmConfig(o)
		cfg.Image, cfg.MemoryMiB, cfg.VCPUs = r.img, r.v.MemoryMiB, r.v.VCPUs
		memMiB, vcpus := cfg.Resources()
		mem, cpus = strconv.Itoa(memMiB), strconv.Itoa(vcpus)
		mib = f1(float64(r.img.Size) / (1 << 20))
		if machine == "" {
			machine = vm.MachineFor(m)
		}
	}
	drv := r.v.VMM
	if drv == "" {
		drv = vmm.DefaultDriver
	}
	return []string{r.v.Name, strings.ToUpper(string(accel)), rootfs, kernel, machine, drv, mem, cpus, strconv.Itoa(runs), mib}
}

// row renders one variant; a variant without a successful run has empty
// measurements and the reason in the last column.
func (r *bootRow) row(o *Options) []string {
	accel := o.Accel
	if accel == "" {
		accel = vmm.TCG
	}
	row := r.head(o, accel, len(r.imports))
	for _, p := range bootPhases {
		cell := ""
		if xs := r.phases[p]; len(xs) > 0 {
			cell = f3(median(xs))
		}
		row = append(row, cell)
	}
	if len(r.imports) == 0 {
		why := "unavailable"
		if r.err != nil {
			why = "failed: " + strings.ReplaceAll(tailStr(r.err.Error(), 200), "|", "/")
		}
		return append(row, "", "", "", "", "", why)
	}
	s := summarize(r.imports)
	return append(row, f3(median(r.imports)), f3(s.Min), f3(s.Max), f3(median(r.cold)), f3(median(r.restore)), "")
}

// emptyRow lists the variant for an accelerator this run did not measure.
func (r *bootRow) emptyRow(o *Options, accel vmm.Accel, why string) []string {
	row := r.head(o, accel, 0)
	for range bootPhases {
		row = append(row, "")
	}
	return append(row, "", "", "", "", "", why)
}

// bootInvoke starts a sandbox of the variant's image with the snapshot
// mode given, invokes the numpy job once, and returns the seconds from
// before the start to the result.
func bootInvoke(ctx context.Context, o *Options, r *bootRow, mode sandbox.SnapshotMode) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cfg := vmConfig(o)
	cfg.VMM, cfg.Machine, cfg.MemoryMiB, cfg.VCPUs = r.v.VMM, r.v.Machine, r.v.MemoryMiB, r.v.VCPUs
	t0 := time.Now()
	sb, err := sandbox.Start(ctx, r.img, sandbox.Options{Snapshots: mode, VM: cfg, BootTimeout: 10 * time.Minute, Timeout: 5 * time.Minute})
	if err != nil {
		return 0, err
	}
	defer sb.Close()
	res, err := sb.Invoke(ctx, &task.Task{Kind: task.KindSource, Source: jobSource, Name: "job"})
	if err != nil {
		return 0, err
	}
	el := time.Since(t0).Seconds()
	if !res.OK {
		return 0, fmt.Errorf("job failed: %v", res.Error)
	}
	if got := string(res.Value.Data); got != jobWant {
		return 0, fmt.Errorf("job returned %s, want %s", got, jobWant)
	}
	if mode == sandbox.SnapshotUse && sb.Restores.Load() == 0 {
		return 0, errors.New("the sandbox cold-booted instead of restoring a snapshot")
	}
	return el, nil
}

// bootOnce cold-boots the variant's image to run bootScript and returns the
// VM's timings and the import time the guest printed.
func bootOnce(ctx context.Context, o *Options, r *bootRow) (vm.Timings, float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cfg := vmConfig(o)
	cfg.Image, cfg.VMM, cfg.Machine, cfg.MemoryMiB, cfg.VCPUs = r.img, r.v.VMM, r.v.Machine, r.v.MemoryMiB, r.v.VCPUs
	var stdout, stderr bytes.Buffer
	m, err := vm.New(cfg, vm.WithCommand([]string{"python3", "-c", bootScript}, nil, vm.Stdio{Stdout: &stdout, Stderr: &stderr}))
	if err != nil {
		return vm.Timings{}, 0, fmt.Errorf("preparing the VM: %w", err)
	}
	defer m.Close()
	if err := m.Start(ctx); err != nil {
		return vm.Timings{}, 0, fmt.Errorf("starting the VM: %w", err)
	}
	exit, err := m.Wait(ctx)
	if err != nil {
		return vm.Timings{}, 0, fmt.Errorf("waiting for the command: %w", err)
	}
	if exit.Code != 0 || exit.Signal != "" || exit.Error != "" || exit.OOM {
		return vm.Timings{}, 0, fmt.Errorf("guest command exited %d (signal %q, error %q, oom %v): %s", exit.Code, exit.Signal, exit.Error, exit.OOM, tailStr(stderr.String(), 1500))
	}
	secs, err := parseSeconds(stdout.String())
	if err != nil {
		return vm.Timings{}, 0, err
	}
	return m.Timings(), secs, nil
}

// parseSeconds reads the last non-empty line of out as a positive number.
func parseSeconds(out string) (float64, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	last := strings.TrimSpace(lines[len(lines)-1])
	v, err := strconv.ParseFloat(last, 64)
	if err != nil || !(v > 0) {
		return 0, fmt.Errorf("parsing the import time: want seconds on the last line of the output, got %q", tailStr(out, 300))
	}
	return v, nil
}

// openWarm opens and verifies an image, extracts its kernel and initramfs
// and reads the whole file once, so that boots find it in the page cache.
func openWarm(path string) (*image.Image, error) {
	img, err := image.OpenVerified(path)
	if err != nil {
		return nil, err
	}
	if _, _, err := img.BootFiles(); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := io.Copy(io.Discard, f); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return img, nil
}

// localImage returns an image of pkg's bench spec built with bo, on the
// local disk: Options.Images[pkg] when its root filesystem and compression
// are what bo builds and bo names no kernel (given is then true), else
// o.Work/images/<pkg>-<variant>-<key>.kimg, built when missing. The key
// covers the spec, the agent, kiln-init, the running kiln and bo, so a
// change to any of them builds a new image.
func localImage(ctx context.Context, o *Options, pkg, variant string, bo build.Options) (path string, given bool, err error) {
	s, data, err := Spec(pkg)
	if err != nil {
		return "", false, err
	}
	wantFS, wantComp := "erofs", bo.Compression
	if wantComp == "" {
		wantComp = s.Compression
	}
	if wantComp == "" {
		wantComp = "lz4hc"
	}
	if bo.Filesystem == "squashfs" {
		wantFS, wantComp = "squashfs", "zstd"
	}
	wantKernel := bo.KernelKind
	if wantKernel == "" {
		wantKernel = s.Kernel
	}
	if p := o.Images[pkg]; p != "" && bo.Kernel == "" {
		img, err := image.Open(p)
		if err != nil {
			return "", false, fmt.Errorf("opening the given %s image: %w", pkg, err)
		}
		if img.Manifest != nil && img.Manifest.Rootfs.Filesystem == wantFS && img.Manifest.Rootfs.Compression == wantComp && img.Manifest.KernelKind() == wantKernel {
			return img.Path, true, nil
		}
	}
	initBin := o.Init
	if initBin == "" {
		if initBin, err = build.FindInit(); err != nil {
			return "", false, err
		}
	}
	h := sha256.New()
	h.Write(data)
	h.Write(agent.Source)
	if b, err := os.ReadFile(initBin); err == nil {
		h.Write(b)
	}
	if exe, err := os.Executable(); err == nil {
		if b, err := os.ReadFile(exe); err == nil {
			h.Write(b)
		}
	}
	opts, _ := json.Marshal(struct{ Filesystem, Compression, Kernel, Modules, KernelKind string }{bo.Filesystem, bo.Compression, bo.Kernel, bo.Modules, bo.KernelKind})
	h.Write(opts)
	key := hex.EncodeToString(h.Sum(nil))[:16]
	path = filepath.Join(o.Work, "images", pkg+"-"+variant+"-"+key+".kimg")
	if _, err := os.Stat(path); err == nil {
		return path, false, nil
	}
	o.progress("[prepare] building the %s image, variant %s (a one-time step; cached in %s)", pkg, variant, filepath.Dir(path))
	t0 := time.Now()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", false, err
	}
	bo.Output, bo.Init, bo.Log = path, initBin, o.Log
	res, err := build.Build(ctx, s, bo)
	if err != nil {
		return "", false, err
	}
	o.progress("[prepare] built %s: %s in %.0fs", res.Path, size.Format(res.Size), time.Since(t0).Seconds())
	return path, false, nil
}
