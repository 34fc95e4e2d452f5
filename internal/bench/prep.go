package bench

import (
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kiln-dev/kiln/internal/build"
	"github.com/kiln-dev/kiln/internal/guest/agent"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/spec"
)

//go:embed specs/*.toml
var specFS embed.FS

// Packages are the Python packages the imports experiment knows, each with
// a bench spec in specs/<name>.toml.
var Packages = []string{"numpy", "scipy", "torch"}

// Spec returns the bench spec of pkg.
func Spec(pkg string) (*spec.Spec, []byte, error) {
	data, err := specFS.ReadFile("specs/" + pkg + ".toml")
	if err != nil {
		return nil, nil, fmt.Errorf("no bench spec for %q: want one of %v", pkg, Packages)
	}
	s, err := spec.Parse(data, pkg+".toml", ".")
	if err != nil {
		return nil, nil, err
	}
	return s, data, nil
}

// env is what the experiments need of one package: the many-files tree
// and the image, both inside the simulated filesystem's backing directory.
type env struct {
	Pkg   string
	Tree  string // relative to the backing directory
	Image string // relative to the backing directory (or absolute, when given in Options.Images)
	Files int    // regular files in the tree
}

// prepare stages pkg's rootfs tree and builds its image into o.Work/sim,
// reusing both when the spec, the agent, kiln-init and kiln itself have not
// changed.
func prepare(ctx context.Context, o *Options, pkg string) (*env, error) {
	s, data, err := Spec(pkg)
	if err != nil {
		return nil, err
	}
	initBin := o.Init
	if initBin == "" {
		if initBin, err = build.FindInit(); err != nil {
			return nil, err
		}
	}
	h := sha256.New()
	h.Write(data)
	h.Write(agent.Source)
	if b, err := os.ReadFile(initBin); err == nil {
		h.Write(b)
	}
	// The running kiln holds the build code: a new kiln rebuilds the trees
	// and images rather than measuring ones an older builder made.
	if exe, err := os.Executable(); err == nil {
		if b, err := os.ReadFile(exe); err == nil {
			h.Write(b)
		}
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	backing := filepath.Join(o.Work, "sim")
	e := &env{Pkg: pkg, Tree: filepath.Join("trees", pkg+"-"+key), Image: filepath.Join("images", pkg+"-"+key+".kimg")}
	treeDir := filepath.Join(backing, e.Tree)
	if _, err := os.Stat(filepath.Join(treeDir, ".kiln-bench-done")); err != nil {
		o.progress("[prepare] staging the many-files tree of %s (a one-time step; cached in %s)", pkg, o.Work)
		t0 := time.Now()
		tmp := treeDir + ".tmp"
		os.RemoveAll(tmp)
		if err := os.MkdirAll(filepath.Dir(tmp), 0o755); err != nil {
			return nil, err
		}
		st, err := build.StageRootfs(ctx, s, build.StageOptions{Python: s.Python, Agent: agent.Source, Log: o.Log}, tmp)
		if err != nil {
			os.RemoveAll(tmp)
			return nil, fmt.Errorf("staging the %s tree: %w", pkg, err)
		}
		if err := os.WriteFile(filepath.Join(tmp, ".kiln-bench-done"), []byte(fmt.Sprint(st.Files)), 0o644); err != nil {
			os.RemoveAll(tmp)
			return nil, err
		}
		os.RemoveAll(treeDir)
		if err := os.Rename(tmp, treeDir); err != nil {
			os.RemoveAll(tmp)
			return nil, err
		}
		o.progress("[prepare] staged %s: %d files, %s, in %.0fs", pkg, st.Files, size.Format(st.TreeBytes), time.Since(t0).Seconds())
	}
	if b, err := os.ReadFile(filepath.Join(treeDir, ".kiln-bench-done")); err == nil {
		fmt.Sscan(string(b), &e.Files)
	}
	if p := o.Images[pkg]; p != "" {
		abs, err := filepath.Abs(p)
		if err != nil {
			return nil, err
		}
		// Copy the given image into the simulated filesystem.
		e.Image = filepath.Join("images", pkg+"-given.kimg")
		if err := copyFile(abs, filepath.Join(backing, e.Image)); err != nil {
			return nil, fmt.Errorf("copying image %s: %w", p, err)
		}
		return e, nil
	}
	imgPath := filepath.Join(backing, e.Image)
	if _, err := os.Stat(imgPath); err != nil {
		o.progress("[prepare] building the kiln image of %s (a one-time step)", pkg)
		t0 := time.Now()
		if err := os.MkdirAll(filepath.Dir(imgPath), 0o755); err != nil {
			return nil, err
		}
		res, err := build.Build(ctx, s, build.Options{Output: imgPath, Init: initBin, Log: o.Log})
		if err != nil {
			return nil, fmt.Errorf("building the %s image: %w", pkg, err)
		}
		o.progress("[prepare] built %s: %s in %.0fs", res.Path, size.Format(res.Size), time.Since(t0).Seconds())
	}
	return e, nil
}

func copyFile(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if old, err := os.Stat(dst); err == nil && old.Size() == int64(len(in)) {
		if cur, err := os.ReadFile(dst); err == nil && string(cur) == string(in) {
			return nil
		}
	}
	return writeAtomic(dst, in)
}
