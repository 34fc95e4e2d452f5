package pid1

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/guest/proto"
)

// rootFlags are the flags of the guest's root: a small tmpfs holding one
// bind mount of each top-level entry of the image (see mountRoot), kept
// read-only except while a volume's top-level mountpoint is created.
const rootFlags = unix.MS_NOSUID | unix.MS_NODEV

// ninepOptions are the 9p mount options of every volume: virtio
// transport, the Linux dialect, the largest message the virtio transport
// of Linux 6.1 takes (PAGE_SIZE × (128 − 3) bytes), and no guest cache,
// so the guest sees host changes at once.
const ninepOptions = "trans=virtio,version=9p2000.L,msize=512000"

// checkVolumes validates volumes from the host: known slot tags, guest
// paths kiln allows (proto.CheckGuestPath), none inside another.
func checkVolumes(vols []proto.Volume) error {
	if len(vols) > proto.VolumeSlots {
		return fmt.Errorf("%d volumes, at most %d", len(vols), proto.VolumeSlots)
	}
	tags := map[string]bool{}
	for i := range proto.VolumeSlots {
		tags[proto.VolumeTag(i)] = true
	}
	for i, v := range vols {
		if !tags[v.Tag] {
			return fmt.Errorf("volume %s: unknown or repeated slot tag %q", v.Path, v.Tag)
		}
		tags[v.Tag] = false
		if err := proto.CheckGuestPath(v.Path); err != nil {
			return fmt.Errorf("volume %s: %w", v.Path, err)
		}
		for _, w := range vols[:i] {
			if within(v.Path, w.Path) || within(w.Path, v.Path) {
				return fmt.Errorf("volumes %s and %s: one is inside the other", w.Path, v.Path)
			}
		}
	}
	return nil
}

// decodeMount decodes and checks a Mount frame's payload.
func decodeMount(payload []byte) ([]proto.Volume, error) {
	var m proto.MountMsg
	if err := json.Unmarshal(payload, &m); err != nil {
		return nil, fmt.Errorf("decoding the mount request: %w", err)
	}
	if err := checkVolumes(m.Volumes); err != nil {
		return nil, fmt.Errorf("mounting volumes: %w", err)
	}
	return m.Volumes, nil
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, dir+"/")
}

// mountVolumes mounts every volume, or, when one fails, unmounts those
// mounted before it and returns the error.
func mountVolumes(root string, vols []proto.Volume) (err error) {
	if err := checkVolumes(vols); err != nil {
		return fmt.Errorf("mounting volumes: %w", err)
	}
	var done []string
	defer func() {
		if err != nil {
			for _, p := range done {
				_ = unix.Unmount(p, unix.MNT_DETACH)
			}
		}
	}()
	for _, v := range vols {
		p := root + v.Path
		if err := makeMountpoint(root, v.Path); err != nil {
			return fmt.Errorf("mounting volume %s: %w", v.Path, err)
		}
		flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
		if v.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount(v.Tag, p, "9p", flags, ninepOptions); err != nil {
			if errors.Is(err, unix.ENODEV) {
				return fmt.Errorf("mounting volume %s: the guest kernel has no 9p filesystem: use kiln's kernel (kernel = \"minimal\" in kiln.toml)", v.Path)
			}
			return fmt.Errorf("mounting volume %s (9p tag %s): %w", v.Path, v.Tag, err)
		}
		done = append(done, p)
	}
	return nil
}

// makeMountpoint makes sure the directory guest (a path in the guest,
// under root) exists. A new top-level directory is created on the root
// tmpfs, which is made writable for that moment only; deeper ones can be
// created where the guest can write (a new top-level directory, /tmp), not
// inside the read-only image.
func makeMountpoint(root, guest string) error {
	p := root + guest
	if fi, err := os.Stat(p); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s exists in the image and is not a directory: mount the volume elsewhere", guest)
		}
		return nil
	}
	top, _, _ := strings.Cut(guest[1:], "/")
	if _, err := os.Lstat(root + "/" + top); errors.Is(err, fs.ErrNotExist) {
		if err := remountRoot(root, false); err != nil {
			return err
		}
		err := os.Mkdir(root+"/"+top, 0o755)
		if rerr := remountRoot(root, true); err == nil {
			err = rerr
		}
		if err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("creating mountpoint /%s: %w", top, err)
		}
	}
	if err := os.MkdirAll(p, 0o755); err != nil {
		if errors.Is(err, unix.EROFS) {
			return fmt.Errorf("creating mountpoint %s: the image is read-only there: mount the volume on a new top-level directory (such as /data) or under /tmp", guest)
		}
		return fmt.Errorf("creating mountpoint %s: %w", guest, err)
	}
	return nil
}

// remountRoot makes the root tmpfs read-only or writable.
func remountRoot(root string, readOnly bool) error {
	flags := uintptr(unix.MS_REMOUNT | rootFlags)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", root+"/", "", flags, ""); err != nil {
		return fmt.Errorf("remounting the guest root (read-only %t): %w", readOnly, err)
	}
	return nil
}
