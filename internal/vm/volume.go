package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/vmm"
)

// Volume is a host directory shared into a VM (kiln run --volume,
// kiln serve --volume). A VM of kiln's kernel has proto.VolumeSlots
// virtio-9p devices, used or not, so volumes do not change the machine a
// snapshot was taken of: a cold boot mounts them before the command or
// agent starts, a restore right after the state is loaded, and a
// snapshot source mounts none.
type Volume struct {
	Host     string // an absolute, symlink-free directory on the host
	Guest    string // where it appears in the guest (proto.CheckGuestPath)
	ReadOnly bool
}

// String returns the volume as the flag is written: HOST:GUEST:ro|rw.
func (v Volume) String() string {
	mode := "rw"
	if v.ReadOnly {
		mode = "ro"
	}
	return v.Host + ":" + v.Guest + ":" + mode
}

// ParseVolume parses HOST:GUEST[:ro|:rw] (read-only unless :rw) and checks
// both sides: HOST, relative to the working directory when not absolute,
// must be an existing directory (symlinks are resolved once, here);
// GUEST must be a path kiln can mount on (proto.CheckGuestPath).
func ParseVolume(s string) (Volume, error) {
	v, err := parseVolume(s)
	if err != nil {
		return Volume{}, err
	}
	abs, err := filepath.Abs(v.Host)
	if err != nil {
		return Volume{}, fmt.Errorf("volume %s: resolving %s: %w", s, v.Host, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return Volume{}, fmt.Errorf("volume %s: host directory %s does not exist: create it or fix the path", s, abs)
		}
		return Volume{}, fmt.Errorf("volume %s: resolving %s: %w", s, abs, err)
	}
	fi, err := os.Stat(real)
	if err != nil {
		return Volume{}, fmt.Errorf("volume %s: %w", s, err)
	}
	if !fi.IsDir() {
		return Volume{}, fmt.Errorf("volume %s: %s is not a directory: a volume shares a directory (put the file in one)", s, abs)
	}
	v.Host = real
	return v, nil
}

// parseVolume is ParseVolume's syntax: no file system access.
func parseVolume(s string) (Volume, error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 {
		return Volume{}, fmt.Errorf("volume %q: want HOST:GUEST or HOST:GUEST:ro|rw (no ':' inside the paths)", s)
	}
	v := Volume{Host: parts[0], Guest: parts[1], ReadOnly: true}
	if len(parts) == 3 {
		switch parts[2] {
		case "ro":
		case "rw":
			v.ReadOnly = false
		default:
			return Volume{}, fmt.Errorf("volume %q: mode %q: want ro or rw", s, parts[2])
		}
	}
	if v.Host == "" {
		return Volume{}, fmt.Errorf("volume %q: empty host directory", s)
	}
	if strings.ContainsAny(v.Host, "\x00\n") {
		return Volume{}, fmt.Errorf("volume %q: host path has a NUL or newline", s)
	}
	if err := proto.CheckGuestPath(v.Guest); err != nil {
		return Volume{}, fmt.Errorf("volume %q: %w", s, err)
	}
	return v, nil
}

// checkVolumes reports volumes a VM of this config cannot mount.
func (c *Config) checkVolumes() error {
	if len(c.Volumes) == 0 {
		return nil
	}
	if k := c.Image.Manifest.KernelKind(); k != "minimal" {
		return fmt.Errorf("volumes need kiln's kernel, which has 9p built in: image %s has the %s kernel, which has none; set kernel = \"minimal\" in kiln.toml and rebuild", c.Image.Manifest.Name, k)
	}
	if len(c.Volumes) > proto.VolumeSlots {
		return fmt.Errorf("%d volumes: a VM takes at most %d", len(c.Volumes), proto.VolumeSlots)
	}
	for i, v := range c.Volumes {
		if !filepath.IsAbs(v.Host) {
			return fmt.Errorf("volume %s: host path is not absolute (use vm.ParseVolume)", v)
		}
		if err := proto.CheckGuestPath(v.Guest); err != nil {
			return fmt.Errorf("volume %s: %w", v, err)
		}
		for _, w := range c.Volumes[:i] {
			if inside(v.Guest, w.Guest) || inside(w.Guest, v.Guest) {
				return fmt.Errorf("volumes %s and %s: one guest path is inside the other; mount them side by side", w, v)
			}
		}
	}
	return nil
}

func inside(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

// hasSlots reports whether VMs of the image get volume slots: images of
// kiln's kernel (9p built in); other kernels have no 9p.
func (c *Config) hasSlots() bool { return c.Image.Manifest.KernelKind() == "minimal" }

// protoVolumes are the VM's volumes as init mounts them, slot i for
// volume i.
func (v *VM) protoVolumes() []proto.Volume {
	var out []proto.Volume
	for i, vol := range v.vols {
		out = append(out, proto.Volume{Tag: proto.VolumeTag(i), Path: vol.Guest, ReadOnly: vol.ReadOnly})
	}
	return out
}

// shares are the VM's volume slots: volume i in slot i, the rest (and
// every slot of a snapshot source) an empty read-only directory of the VM.
func (v *VM) shares() ([]vmm.Share, error) {
	if !v.cfg.hasSlots() {
		return nil, nil
	}
	if v.emptyDir == "" {
		d, err := os.MkdirTemp("", "kiln-vm-")
		if err != nil {
			return nil, fmt.Errorf("creating the VM's empty volume directory: %w", err)
		}
		if err := os.Chmod(d, 0o555); err != nil {
			os.Remove(d)
			return nil, fmt.Errorf("creating the VM's empty volume directory: %w", err)
		}
		v.emptyDir = d
	}
	sh := make([]vmm.Share, proto.VolumeSlots)
	for i := range sh {
		sh[i] = vmm.Share{Tag: proto.VolumeTag(i), Path: v.emptyDir, ReadOnly: true}
		if i < len(v.vols) {
			sh[i].Path, sh[i].ReadOnly = v.vols[i].Host, v.vols[i].ReadOnly
		}
	}
	return sh, nil
}

// mountWait bounds the wait for init's answer to a Mount frame: an image
// whose kiln-init predates volumes never answers.
// (Mounting took about 0.1 s under TCG.)
const mountWait = 15 * time.Second

// ErrVolumes is wrapped by Start's error when the guest could not mount
// the volumes (a bad guest path, an image whose kiln-init predates
// volumes): the volumes are to blame, not a snapshot being restored.
var ErrVolumes = errors.New("mounting the volumes")

var (
	errNoMountAnswer = fmt.Errorf("kiln-init did not answer within %s; the image's kiln-init may predate volumes: rebuild the image (kiln build)", mountWait)
	errOldInit       = fmt.Errorf("%w: the image's kiln-init predates volumes: rebuild the image with this kiln (kiln build)", ErrVolumes)
)

// mountVolumes asks the restored guest's init to mount the volumes and
// waits for its answer.
func (v *VM) mountVolumes(ctx context.Context) error {
	ctx, cancel := context.WithTimeoutCause(ctx, mountWait, errNoMountAnswer)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { v.Close() })
	defer stop()
	if err := proto.WriteJSON(v.ctl, proto.Mount, proto.MountMsg{Volumes: v.protoVolumes()}); err != nil {
		return fmt.Errorf("asking the guest to mount the volumes: %w", v.Death("kiln-init", err))
	}
	for {
		f, err := v.ctlR.Next()
		if err != nil {
			if context.Cause(ctx) == errNoMountAnswer {
				return fmt.Errorf("%w: %w", ErrVolumes, errNoMountAnswer)
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("mounting the volumes: %w", v.Death("kiln-init", err))
		}
		switch f.Type {
		case proto.Mounted:
			var m proto.MountedMsg
			if err := json.Unmarshal(f.Payload, &m); err != nil {
				return fmt.Errorf("mounting the volumes: decoding init's answer: %w", err)
			}
			if !m.OK {
				return fmt.Errorf("%w: %s", ErrVolumes, m.Error)
			}
			return nil
		case proto.Log:
			v.log.Debug("guest", "line", string(f.Payload))
		default:
			v.log.Debug("unexpected frame while mounting volumes", "type", f.Type)
		}
	}
}
