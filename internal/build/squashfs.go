package build

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// MkSquashfs makes a reproducible squashfs image (zstd, level 19) of dir at
// out. kiln's default root filesystem is erofs, which imports Python
// packages faster; squashfs exists so the two can be measured side by side
// (docs/BENCHMARKS.md).
func MkSquashfs(ctx context.Context, dir, out string) error {
	mk, err := exec.LookPath("mksquashfs")
	if err != nil {
		return errors.New("mksquashfs not found: install squashfs-tools (apt-get install squashfs-tools)")
	}
	tmp := filepath.Join(filepath.Dir(out), "."+filepath.Base(out)+".tmp-squashfs")
	defer os.Remove(tmp)
	cmd := exec.CommandContext(ctx, mk, dir, tmp, "-noappend", "-comp", "zstd", "-Xcompression-level", "19",
		"-all-root", "-mkfs-time", "0", "-all-time", "0", "-no-progress", "-quiet")
	var outb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outb, &outb
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("mksquashfs failed: %w: %s", err, tailString(outb.String(), 2000))
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("creating squashfs image: %w", err)
	}
	return nil
}
