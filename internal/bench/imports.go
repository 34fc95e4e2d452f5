package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/bench/simfs"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/vm"
)

// Import modes: where the Python environment comes from.
const (
	ModeTree  = "many-files tree (bwrap)"
	ModeLoop  = "kiln image, loop-mounted erofs (bwrap)"
	ModeVM    = "kiln image, kiln VM"
	importTag = "KILN_IMPORT_S="
)

// ImportResult is one measured import.
type ImportResult struct {
	Package string
	Mode    string
	Meta    time.Duration // the model's metadata latency
	ImportS float64       // time of the import statement, measured by Python
	WallS   float64       // the whole run: process (or VM) start to exit, mounts included
	Ops     simfs.Counts  // the model's counts over the whole run
}

var importRe = regexp.MustCompile(importTag + `([0-9.eE+-]+)`)

func importScript(pkg string) string {
	return "import time; t = time.perf_counter(); import " + pkg + "; print('" + importTag + "%.6f' % (time.perf_counter() - t))"
}

func parseImportTime(out string) (float64, error) {
	m := importRe.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no %s line in the output: %s", importTag, tailStr(out, 800))
	}
	return strconv.ParseFloat(m[1], 64)
}

func tailStr(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// bwrapArgs runs argv with root as the root filesystem, read-only.
func bwrapArgs(root string, env map[string]string, argv ...string) []string {
	args := []string{"--ro-bind", root, "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
		"--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp"}
	for k, v := range env {
		args = append(args, "--setenv", k, v)
	}
	return append(append(args, "--"), argv...)
}

func runCmd(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("%s not found: install it (apt-get install bubblewrap util-linux): %w", name, err)
		}
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args[:min(len(args), 4)], " "), err, tailStr(out.String(), 1500))
	}
	return out.String(), nil
}

// importer runs one package's imports in the three modes.
type importer struct {
	o    *Options
	sim  *simfs.FS
	e    *env
	img  *image.Image // opened once from the simulated filesystem, nil without VMs
	root image.Part
}

func newImporter(o *Options, sim *simfs.FS, e *env) (*importer, error) {
	im := &importer{o: o, sim: sim, e: e}
	path := filepath.Join(sim.Mountpoint, e.Image)
	img, err := image.Open(path)
	if err != nil {
		return nil, err
	}
	root, ok := img.Part(image.PartRootfs)
	if !ok {
		return nil, fmt.Errorf("image %s has no rootfs part", path)
	}
	im.root = root
	if !o.NoVM {
		// Verify (hashes every part, then cached) and extract the kernel
		// once, outside the measurements.
		if img, err = image.OpenVerified(path); err != nil {
			return nil, err
		}
		if _, _, err := img.BootFiles(); err != nil {
			return nil, err
		}
		im.img = img
	}
	return im, nil
}

func (im *importer) env() map[string]string {
	s, _, _ := Spec(im.e.Pkg)
	if s == nil {
		return nil
	}
	return s.Env
}

// run measures one import in mode.
func (im *importer) run(ctx context.Context, mode string) (*ImportResult, error) {
	pkg := im.e.Pkg
	r := &ImportResult{Package: pkg, Mode: mode, Meta: im.sim.Params().Meta}
	script := importScript(pkg)
	before := im.sim.Counts()
	t0 := time.Now()
	var out string
	var err error
	switch mode {
	case ModeTree:
		out, err = runCmd(ctx, "bwrap", bwrapArgs(filepath.Join(im.sim.Mountpoint, im.e.Tree), im.env(), "python3", "-c", script)...)
	case ModeLoop:
		out, err = im.loopRun(ctx, script)
	case ModeVM:
		out, err = im.vmRun(ctx, script)
	default:
		return nil, fmt.Errorf("unknown import mode %q", mode)
	}
	r.WallS = time.Since(t0).Seconds()
	r.Ops = im.sim.Counts().Sub(before)
	if err != nil {
		return nil, fmt.Errorf("import %s from %s: %w", pkg, mode, err)
	}
	if r.ImportS, err = parseImportTime(out); err != nil {
		return nil, fmt.Errorf("import %s from %s: %w", pkg, mode, err)
	}
	return r, nil
}

// loopRun mounts the image's rootfs byte range with a loop device, runs
// the script in it and unmounts it again.
func (im *importer) loopRun(ctx context.Context, script string) (string, error) {
	dir, err := os.MkdirTemp("", "kiln-bench-loop-")
	if err != nil {
		return "", err
	}
	defer os.Remove(dir)
	opts := fmt.Sprintf("loop,ro,offset=%d,sizelimit=%d", im.root.Offset, im.root.Size)
	if _, err := runCmd(ctx, "mount", "-t", "erofs", "-o", opts, filepath.Join(im.sim.Mountpoint, im.e.Image), dir); err != nil {
		return "", fmt.Errorf("loop-mounting the image's erofs rootfs (needs root and the erofs module): %w", err)
	}
	out, err := runCmd(ctx, "bwrap", bwrapArgs(dir, im.env(), "python3", "-c", script)...)
	if _, uerr := runCmd(context.Background(), "umount", dir); uerr != nil {
		runCmd(context.Background(), "umount", "-l", dir)
	}
	return out, err
}

// vmRun boots the image from the simulated filesystem and runs the script.
func (im *importer) vmRun(ctx context.Context, script string) (string, error) {
	if im.img == nil {
		return "", errors.New("VM rows disabled")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cfg := vmConfig(im.o)
	cfg.Image = im.img
	v, err := vm.New(cfg, vm.WithCommand([]string{"python3", "-c", script}, nil, vm.Stdio{Stdout: &stdout, Stderr: &stderr}))
	if err != nil {
		return "", err
	}
	defer v.Close()
	if err := v.Start(ctx); err != nil {
		return "", err
	}
	exit, err := v.Wait(ctx)
	if err != nil {
		return "", err
	}
	if exit.Code != 0 || exit.Error != "" {
		return "", fmt.Errorf("guest command exited %d %s: %s", exit.Code, exit.Error, tailStr(stderr.String(), 1500))
	}
	return stdout.String(), nil
}

// Imports times `import numpy|scipy|torch` and counts the model's
// operations, from the many-files tree, from the loop-mounted image and in
// a kiln VM, all stored on the simulated filesystem, sweeping the metadata
// latency.
func Imports(ctx context.Context, o Options) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	pkgs := o.Packages
	lats := []time.Duration{100 * time.Microsecond, time.Millisecond, 10 * time.Millisecond}
	runs := 2
	if o.Quick {
		lats = []time.Duration{time.Millisecond}
		runs = 1
		if pkgs == nil {
			pkgs = []string{"numpy"}
		}
	}
	if pkgs == nil {
		pkgs = Packages
	}
	if o.Runs > 0 {
		runs = o.Runs
	}
	modes := []string{ModeTree, ModeLoop, ModeVM}
	if o.NoVM {
		modes = modes[:2]
	}
	var envs []*env
	var skipped []string
	for _, p := range pkgs {
		e, err := prepare(ctx, &o, p)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			// One package that cannot be built does not void the others.
			o.progress("[imports] skipping %s: %v", p, err)
			skipped = append(skipped, fmt.Sprintf("%s was skipped: %v", p, err))
			continue
		}
		envs = append(envs, e)
	}
	if len(envs) == 0 {
		return nil, fmt.Errorf("no package could be prepared: %s", strings.Join(skipped, "; "))
	}
	sim, err := mountSim(&o, o.Model)
	if err != nil {
		return nil, err
	}
	defer unmountSim(sim, o.Log)
	ims := map[string]*importer{}
	for _, e := range envs {
		im, err := newImporter(&o, sim, e)
		if err != nil {
			return nil, err
		}
		ims[e.Pkg] = im
	}
	rep := &Report{
		Name:  "imports",
		Title: "Import time and metadata operations on the simulated shared filesystem",
		Env:   DetectEnv(o.Accel, o.Quick),
		Columns: []string{"package", "source", "meta_latency_ms", "runs", "import_s_mean", "import_s_min", "wall_s_mean",
			"meta_ops", "all_ops", "read_mb", "tree_meta_ops_ratio"},
	}
	for _, lat := range lats {
		model := o.Model.WithMeta(lat)
		sim.SetParams(model)
		rep.Models = append(rep.Models, model)
		for _, e := range envs {
			treeMeta := int64(0)
			for _, mode := range modes {
				var rs []*ImportResult
				for i := 0; i < runs; i++ {
					if err := ctx.Err(); err != nil {
						return nil, err
					}
					r, err := ims[e.Pkg].run(ctx, mode)
					if err != nil {
						return nil, err
					}
					o.progress("[imports] %-5s %-40s meta=%-6s run %d/%d: import %.2fs, wall %.2fs, %d metadata ops (%s)", e.Pkg, mode, lat, i+1, runs, r.ImportS, r.WallS, r.Ops.Meta(), r.Ops)
					rs = append(rs, r)
				}
				var imp, wall []float64
				var meta, tot, bytes int64
				for _, r := range rs {
					imp = append(imp, r.ImportS)
					wall = append(wall, r.WallS)
					meta += r.Ops.Meta()
					tot += r.Ops.Total()
					bytes += r.Ops.ReadBytes
				}
				n := int64(len(rs))
				meta, tot, bytes = meta/n, tot/n, bytes/n
				if mode == ModeTree {
					treeMeta = meta
				}
				ratio := ""
				if treeMeta > 0 && meta > 0 {
					ratio = f1(float64(treeMeta) / float64(meta))
				}
				si, sw := summarize(imp), summarize(wall)
				rep.Rows = append(rep.Rows, []string{e.Pkg, mode, msStr(lat), strconv.Itoa(len(rs)), f3(si.Mean), f3(si.Min), f3(sw.Mean),
					strconv.FormatInt(meta, 10), strconv.FormatInt(tot, 10), f1(float64(bytes) / 1e6), ratio})
			}
		}
	}
	rep.Notes = append(rep.Notes,
		"Sources: *"+ModeTree+"*: the staged rootfs tree of the package's kiln spec (the same files the image holds, one file each) on the simulated filesystem, used as the root of a bubblewrap sandbox; *"+ModeLoop+"*: the kiln image file on the simulated filesystem, its rootfs byte range mounted with `mount -t erofs -o loop,ro,offset=…,sizelimit=…` (mount and unmount are inside the measured run); *"+ModeVM+"*: a kiln VM booted (run mode) with the image file on the simulated filesystem.",
		"import_s is the `import` statement alone, timed by Python; wall_s is the whole run (sandbox or VM start to exit). meta_ops counts the model's metadata operations (lookup, getattr, open, readdir, readlink, …) over the whole run; tree_meta_ops_ratio is the tree's count divided by the row's.")
	rep.Notes = append(rep.Notes, skipped...)
	if err := rep.write(o.Out); err != nil {
		return nil, err
	}
	pngs, err := plotImports(rep, o.Out)
	if err != nil {
		return nil, err
	}
	rep.Files = append(rep.Files, pngs...)
	return rep, nil
}

func shortMode(m string) string {
	switch m {
	case ModeTree:
		return "many-files tree"
	case ModeLoop:
		return "image (loop mount)"
	case ModeVM:
		return "image (kiln VM)"
	}
	return m
}

func msStr(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'g', -1, 64)
}
