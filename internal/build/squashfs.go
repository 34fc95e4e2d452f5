package build

import (
	"context"
	"errors"
	"os/exec"
)

// MkSquashfs makes a reproducible squashfs image (zstd, level 19) of dir at
// out. kiln's default root filesystem is erofs, which imports Python
// packages faster; squashfs exists so the two can be measured side by side
// (docs/benchmarks.md).
func MkSquashfs(ctx context.Context, dir, out string) error {
	mk, err := exec.LookPath("mksquashfs")
	if err != nil {
		return errors.New("mksquashfs not found: install squashfs-tools (apt-get install squashfs-tools)")
	}
	// -noappend: the temporary file exists (empty) and must be overwritten.
	return mkfsAtomic(ctx, mk, out, nil, func(tmp string) []string {
		return []string{dir, tmp, "-noappend", "-comp", "zstd", "-Xcompression-level", "19",
			"-all-root", "-mkfs-time", "0", "-all-time", "0", "-no-progress", "-quiet"}
	})
}
