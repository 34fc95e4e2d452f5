package simfs

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Op kinds, as FUSE names them.
const (
	OpLookup      = "lookup"
	OpGetAttr     = "getattr"
	OpSetAttr     = "setattr"
	OpReadlink    = "readlink"
	OpAccess      = "access"
	OpGetXAttr    = "getxattr"
	OpListXAttr   = "listxattr"
	OpSetXAttr    = "setxattr"
	OpRemoveXAttr = "removexattr"
	OpOpen        = "open"
	OpCreate      = "create"
	OpOpenDir     = "opendir"
	OpReadDir     = "readdir"
	OpReadDirPlus = "readdirplus"
	OpStatFs      = "statfs"
	OpStatx       = "statx"
	OpMknod       = "mknod"
	OpMkdir       = "mkdir"
	OpUnlink      = "unlink"
	OpRmdir       = "rmdir"
	OpRename      = "rename"
	OpLink        = "link"
	OpSymlink     = "symlink"
	OpTmpfile     = "tmpfile"
	// Counted, not delayed: the kernel sends them asynchronously or they
	// carry no round trip to a metadata server in the model.
	OpForget = "forget"
	// OpGetAttrFh is a getattr on an open file handle: fstat, or the
	// kernel revalidating before each read (attribute timeout 0). A Lustre
	// client answers it from the locks it got at open, without a metadata
	// round trip, so the model does not delay it.
	OpGetAttrFh  = "getattr_fh"
	OpRelease    = "release"
	OpReleaseDir = "releasedir"
	OpFlush      = "flush"
	OpFsync      = "fsync"
	OpFsyncDir   = "fsyncdir"
	OpLseek      = "lseek"
	OpLock       = "lock"
	OpIoctl      = "ioctl"
	OpFallocate  = "fallocate"
	OpWrite      = "write"
	OpCopyRange  = "copy_file_range"
	// Data.
	OpRead = "read"
)

// metaOps are delayed by Params.Meta and counted as metadata operations.
var metaOps = map[string]bool{
	OpLookup: true, OpGetAttr: true, OpSetAttr: true, OpReadlink: true, OpAccess: true,
	OpGetXAttr: true, OpListXAttr: true, OpSetXAttr: true, OpRemoveXAttr: true,
	OpOpen: true, OpCreate: true, OpOpenDir: true, OpReadDir: true, OpReadDirPlus: true,
	OpStatFs: true, OpStatx: true, OpMknod: true, OpMkdir: true, OpUnlink: true,
	OpRmdir: true, OpRename: true, OpLink: true, OpSymlink: true, OpTmpfile: true,
}

// IsMeta reports whether operations of kind are metadata operations of the model.
func IsMeta(kind string) bool { return metaOps[kind] }

// Counts are operation counts by kind, plus totals the model measured.
type Counts struct {
	Ops       map[string]int64 `json:"ops"`
	ReadBytes int64            `json:"read_bytes"`
	// Injected is the delay the model actually added (sleeps overshoot
	// the nominal latency by the timer's slack).
	Injected time.Duration `json:"injected_ns"`
}

// Meta is the number of metadata operations.
func (c Counts) Meta() int64 {
	var n int64
	for k, v := range c.Ops {
		if metaOps[k] {
			n += v
		}
	}
	return n
}

// Total is the number of operations of every kind.
func (c Counts) Total() int64 {
	var n int64
	for _, v := range c.Ops {
		n += v
	}
	return n
}

// Sub returns c minus an earlier snapshot.
func (c Counts) Sub(prev Counts) Counts {
	out := Counts{Ops: map[string]int64{}, ReadBytes: c.ReadBytes - prev.ReadBytes, Injected: c.Injected - prev.Injected}
	for k, v := range c.Ops {
		if d := v - prev.Ops[k]; d != 0 {
			out.Ops[k] = d
		}
	}
	return out
}

// String lists the non-zero counts, largest first: "lookup=120 getattr=80 …".
func (c Counts) String() string {
	type kv struct {
		k string
		v int64
	}
	var all []kv
	for k, v := range c.Ops {
		if v != 0 {
			all = append(all, kv{k, v})
		}
	}
	sort.Slice(all, func(i, j int) bool {
		if all[i].v != all[j].v {
			return all[i].v > all[j].v
		}
		return all[i].k < all[j].k
	})
	s := ""
	for i, e := range all {
		if i > 0 {
			s += " "
		}
		s += fmt.Sprintf("%s=%d", e.k, e.v)
	}
	if s == "" {
		return "none"
	}
	return s
}

// FS is a mounted model filesystem.
type FS struct {
	Backing    string // the local directory holding the data
	Mountpoint string

	server *fuse.Server
	log    *slog.Logger

	params atomic.Pointer[Params]
	mu     sync.Mutex // guards counts, bytes, injected, linkFree
	counts map[string]int64
	bytes  int64
	inj    time.Duration
	// linkFree is when the modelled data link is next idle (bandwidth cap).
	linkFree time.Time

	unmountOnce sync.Once
	unmountErr  error
}

// Mount serves backing at mountpoint (an existing empty directory) through
// the model p. The caller must Unmount, also on failure paths.
func Mount(backing, mountpoint string, p Params, log *slog.Logger) (*FS, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return nil, fmt.Errorf("the simulated filesystem needs FUSE: /dev/fuse is missing (modprobe fuse; in a container pass --device /dev/fuse): %w", err)
	}
	root, err := fs.NewLoopbackRoot(backing)
	if err != nil {
		return nil, fmt.Errorf("opening backing directory %s: %w", backing, err)
	}
	zero := time.Duration(0)
	opts := &fs.Options{
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		MountOptions: fuse.MountOptions{
			AllowOther:  os.Geteuid() == 0,
			FsName:      "kiln-simfs",
			Name:        "kilnsim",
			DirectMount: os.Geteuid() == 0,
			// Each read request is one round trip in the model; keep them
			// large like a real client's.
			MaxReadAhead: 1 << 20,
			// No FUSE passthrough (kernel 6.9+): reads must reach the model
			// instead of going straight to the backing file.
			DisabledCapabilities: fuse.CAP_PASSTHROUGH,
		},
	}
	f := &FS{Backing: backing, Mountpoint: mountpoint, log: log, counts: map[string]int64{}}
	f.SetParams(p)
	raw := &counting{RawFileSystem: fs.NewNodeFS(root, opts), fs: f}
	srv, err := fuse.NewServer(raw, mountpoint, &opts.MountOptions)
	if err != nil {
		if _, lerr := exec.LookPath("fusermount3"); lerr != nil && os.Geteuid() != 0 {
			return nil, fmt.Errorf("mounting the simulated filesystem at %s (install fuse3): %w", mountpoint, err)
		}
		return nil, fmt.Errorf("mounting the simulated filesystem at %s: %w", mountpoint, err)
	}
	f.server = srv
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		f.Unmount()
		return nil, fmt.Errorf("waiting for the simulated filesystem mount: %w", err)
	}
	log.Debug("simulated filesystem mounted", "backing", backing, "mountpoint", mountpoint, "params", p.String())
	return f, nil
}

// Params returns the current model parameters.
func (f *FS) Params() Params { return *f.params.Load() }

// SetParams changes the model for the following operations.
func (f *FS) SetParams(p Params) { f.params.Store(&p) }

// Counts returns a snapshot of the operation counts since the mount.
func (f *FS) Counts() Counts {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := Counts{Ops: make(map[string]int64, len(f.counts)), ReadBytes: f.bytes, Injected: f.inj}
	for k, v := range f.counts {
		c.Ops[k] = v
	}
	return c
}

// Unmount unmounts the filesystem; it retries a busy mount for a few
// seconds and finally detaches it lazily. It is idempotent.
func (f *FS) Unmount() error {
	f.unmountOnce.Do(func() {
		var err error
		for i := 0; i < 20; i++ {
			if err = f.server.Unmount(); err == nil {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		if err != nil {
			f.log.Warn("simulated filesystem busy; detaching it lazily", "mountpoint", f.Mountpoint, "error", err)
			if lerr := unix.Unmount(f.Mountpoint, unix.MNT_DETACH); lerr != nil {
				f.unmountErr = fmt.Errorf("unmounting %s (try umount -l %s): %w", f.Mountpoint, f.Mountpoint, errors.Join(err, lerr))
				return
			}
		}
		f.server.Wait()
	})
	return f.unmountErr
}

// op counts one operation of kind and applies the metadata latency.
func (f *FS) op(kind string) {
	var d time.Duration
	if metaOps[kind] {
		d = f.params.Load().Meta
	}
	t0 := time.Now()
	if d > 0 {
		sleepUntil(t0.Add(d))
	}
	f.mu.Lock()
	f.counts[kind]++
	if d > 0 {
		f.inj += time.Since(t0)
	}
	f.mu.Unlock()
}

// read counts a read of n bytes and applies the per-request latency and
// the bandwidth cap (one shared link: transfers queue behind each other).
func (f *FS) read(n int) {
	p := f.params.Load()
	t0 := time.Now()
	end := t0.Add(p.Read)
	f.mu.Lock()
	f.counts[OpRead]++
	f.bytes += int64(n)
	if p.BandwidthMBps > 0 {
		xfer := time.Duration(float64(n) / (p.BandwidthMBps * 1e6) * float64(time.Second))
		start := end
		if f.linkFree.After(start) {
			start = f.linkFree
		}
		end = start.Add(xfer)
		f.linkFree = end
	}
	f.mu.Unlock()
	if end.After(t0) {
		sleepUntil(end)
		f.mu.Lock()
		f.inj += time.Since(t0)
		f.mu.Unlock()
	}
}

// sleepUntil blocks the OS thread with nanosleep, which is finer than the
// Go timer (about 1 ms granularity under load).
func sleepUntil(t time.Time) {
	for {
		d := time.Until(t)
		if d <= 0 {
			return
		}
		ts := unix.NsecToTimespec(int64(d))
		if err := unix.Nanosleep(&ts, nil); err != nil && err != unix.EINTR {
			return
		}
	}
}
