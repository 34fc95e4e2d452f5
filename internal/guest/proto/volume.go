package proto

import (
	"errors"
	"fmt"
	"path"
	"strconv"
	"strings"
)

// VolumeSlots is the number of host-directory devices (virtio-9p) every
// VM of kiln's kernel has, used or not: a snapshot and its restores must
// present the same devices, so the set is fixed and a restore fills the
// slots it needs. It bounds the --volume flags of one VM.
const VolumeSlots = 4

// VolumeTag returns the 9p mount tag of volume slot i ("kiln0"…).
func VolumeTag(i int) string { return "kiln" + strconv.Itoa(i) }

// reservedTop lists the top-level guest directories a volume may not be
// mounted on or under: the system (shadowing it breaks the interpreter or
// init) and the kernel's filesystems.
var reservedTop = map[string]bool{
	"bin": true, "boot": true, "dev": true, "etc": true, "lib": true, "lib32": true,
	"lib64": true, "libx32": true, "proc": true, "run": true, "sbin": true,
	"sys": true, "usr": true, "var": true,
}

// maxGuestPath bounds a volume's guest path.
const maxGuestPath = 1024

// CheckGuestPath reports whether p can be a volume's place in the guest:
// an absolute, clean path other than /, not on or under a system
// directory (/usr, /lib, /etc, /proc, /dev, …). Host and guest both check
// it.
func CheckGuestPath(p string) error {
	switch {
	case p == "":
		return errors.New("empty guest path")
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("guest path %q is not absolute: write it from the root, such as /data", p)
	case len(p) > maxGuestPath:
		return fmt.Errorf("guest path of %d bytes is longer than %d", len(p), maxGuestPath)
	case strings.ContainsAny(p, "\x00\n"):
		return fmt.Errorf("guest path %q has a NUL or newline", p)
	case p == "/":
		return errors.New("a volume cannot replace the guest's root: give a directory such as /data")
	case path.Clean(p) != p:
		return fmt.Errorf("guest path %q is not clean: write it as %s", p, path.Clean(p))
	}
	top, _, _ := strings.Cut(p[1:], "/")
	if reservedTop[top] {
		return fmt.Errorf("guest path %s would shadow the system directory /%s: mount the volume elsewhere, such as /data or /mnt/x", p, top)
	}
	return nil
}
