package build

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/google/renameio/v2"
)

// MkErofs makes a reproducible erofs image of dir at out: fixed UUID and
// timestamps, all files owned by root. compression is "none", "lz4" or
// "lz4hc" ("" means lz4hc). out appears atomically.
func MkErofs(ctx context.Context, dir, out, compression string) error {
	mkfs, err := exec.LookPath("mkfs.erofs")
	if err != nil {
		return errors.New("mkfs.erofs not found: install erofs-utils (apt-get install erofs-utils)")
	}
	args := []string{"--quiet", "-T0", "--all-root", "-U", "00000000-0000-0000-0000-000000000000", "-x-1"}
	switch compression {
	case "", "lz4hc":
		args = append(args, "-zlz4hc,12")
	case "lz4":
		args = append(args, "-zlz4")
	case "none":
	default:
		return fmt.Errorf("unknown compression %q: use none, lz4 or lz4hc", compression)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return fmt.Errorf("making erofs: %s is not a directory", dir)
	}
	// Reproducible output: mkfs.erofs also honours SOURCE_DATE_EPOCH.
	return mkfsAtomic(ctx, mkfs, out, []string{"SOURCE_DATE_EPOCH=0"}, func(tmp string) []string {
		return append(args, tmp, dir)
	})
}

// mkfsAtomic runs a filesystem maker whose arguments args(tmp) name a
// temporary output file beside out, and renames it to out (mode 0644) when
// the tool succeeds. The temporary file is removed on every failure.
func mkfsAtomic(ctx context.Context, tool, out string, env []string, args func(tmp string) []string) error {
	name := filepath.Base(tool)
	tmp, err := renameio.NewPendingFile(out, renameio.WithTempDir(filepath.Dir(out)), renameio.WithStaticPermissions(0o644))
	if err != nil {
		return fmt.Errorf("creating %s image: %w", name, err)
	}
	defer tmp.Cleanup()
	cmd := exec.CommandContext(ctx, tool, args(tmp.Name())...)
	cmd.Env = append(os.Environ(), env...)
	var outb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outb, &outb
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%s failed: %w: %s", name, err, tailString(outb.String(), 2000))
	}
	if err := tmp.CloseAtomicallyReplace(); err != nil {
		return fmt.Errorf("creating %s image: %w", name, err)
	}
	return nil
}
