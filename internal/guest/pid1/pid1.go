// Package pid1 is the guest's PID 1 (kiln-init): it loads modules, talks to the host over virtio-serial, mounts the erofs root and runs the command or agent.
//
// The logic lives in a library, the way gokrazy keeps its init as
// gokrazy.Boot, so that cmd/kiln-init stays a one-line main and the pieces
// are unit-tested here. Boot never returns: PID 1 exiting panics the kernel,
// so every way out ends in a power-off (after an Exit frame on the ctl port).
package pid1

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/guest/proto"
)

const (
	portClassDir = "/sys/class/virtio-ports"
	rootDevice   = "/dev/vda"
	newRoot      = "/newroot"
	imageRoot    = "/image"
	waitTimeout  = 30 * time.Second
	pollStep     = 5 * time.Millisecond
	chunkSize    = 32 << 10
	maxLogLine   = 4096
	drainTimeout = 2 * time.Second
	exitTimeout  = 10 * time.Second
)

// Boot runs PID 1 and never returns. version is reported to the host in
// the Hello frame.
func Boot(version string) {
	in := &initProc{console: os.Stderr, version: version}
	defer func() {
		if r := recover(); r != nil {
			in.fail(fmt.Errorf("kiln-init panicked: %v", r))
		}
	}()
	in.fail(in.run()) // never returns
}

// startError marks failures to start the user's program (exit code 127).
type startError struct{ err error }

func (e *startError) Error() string { return e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

// initProc is the state of PID 1.
type initProc struct {
	console io.Writer
	version string

	mu  sync.Mutex // serializes frame writes on ctl
	ctl *os.File

	reaper *reaper
}

// uptimeMS returns the time since boot in milliseconds.
func uptimeMS() float64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return float64(ts.Nano()) / 1e6
}

// send writes one frame to the host; without a ctl port it does nothing.
func (in *initProc) send(t proto.Type, payload []byte) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.ctl == nil {
		return nil
	}
	return proto.Write(in.ctl, t, payload)
}

func (in *initProc) sendJSON(t proto.Type, v any) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.ctl == nil {
		return nil
	}
	return proto.WriteJSON(in.ctl, t, v)
}

// logf reports a diagnostic on the console and, when open, the ctl port.
func (in *initProc) logf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Fprintf(in.console, "kiln-init: %s\n", msg)
	_ = in.send(proto.Log, []byte("kiln-init: "+msg))
}

func (in *initProc) event(phase string) {
	in.eventAt(phase, uptimeMS())
}

func (in *initProc) eventAt(phase string, ms float64) {
	_ = in.sendJSON(proto.Event, proto.EventMsg{Phase: phase, UptimeMS: ms})
}

// fail reports a fatal error and powers the VM off. It never returns.
func (in *initProc) fail(err error) {
	if err == nil {
		err = errors.New("init finished without a result")
	}
	code := 1
	var se *startError
	if errors.As(err, &se) {
		code = 127
	}
	fmt.Fprintf(in.console, "kiln-init: fatal: %v\n", err)
	in.finish(proto.ExitMsg{Code: code, Error: err.Error()})
}

// finish sends the Exit frame and powers off. A port write blocks while
// the host end is disconnected, so the send is bounded by exitTimeout.
func (in *initProc) finish(msg proto.ExitMsg) {
	done := make(chan error, 1)
	go func() { done <- in.sendJSON(proto.Exit, msg) }()
	select {
	case err := <-done:
		if err != nil {
			fmt.Fprintf(in.console, "kiln-init: sending exit: %v\n", err)
		}
	case <-time.After(exitTimeout):
		fmt.Fprintf(in.console, "kiln-init: sending exit: host not reading for %v\n", exitTimeout)
	}
	powerOff(in.console)
}

// powerOff syncs and powers the machine off; PID 1 must never exit, so if
// that fails it halts, and failing that blocks forever.
func powerOff(console io.Writer) {
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	fmt.Fprintf(console, "kiln-init: power off: %v\n", err)
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_HALT)
	for {
		time.Sleep(time.Hour)
	}
}

func (in *initProc) run() error {
	if err := mountEarly(); err != nil {
		return err
	}
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		in.console = c
	}
	in.reaper = startReaper()
	if err := loadModules(proto.ModulesList); err != nil {
		return err
	}
	port, err := waitPort(proto.CtlPort)
	if err != nil {
		return err
	}
	ctl, err := openPort(port)
	if err != nil {
		return err
	}
	in.mu.Lock()
	in.ctl = ctl
	in.mu.Unlock()
	if err := in.sendJSON(proto.Hello, proto.HelloMsg{Who: "init", Version: in.version, UptimeMS: uptimeMS(), Features: []string{proto.FeatureVolumes}}); err != nil {
		return fmt.Errorf("sending hello: %w", err)
	}
	rd := proto.NewReader(ctl, maxConfigSize)
	f, err := rd.Next()
	if err != nil {
		return fmt.Errorf("reading config from host: %w", err)
	}
	if f.Type != proto.Config {
		return fmt.Errorf("reading config from host: got %v frame, want config", f.Type)
	}
	cfg, err := decodeConfig(f.Payload)
	if err != nil {
		return err
	}
	if err := configureSystem(cfg); err != nil {
		return err
	}
	if err := mountRoot(cfg.TmpfsMiB); err != nil {
		return err
	}
	in.event(proto.PhaseRootfsMounted)
	if err := mountVolumes("", cfg.Volumes); err != nil {
		return err
	}
	var stdin *os.File
	if cfg.Mode == proto.ModeRun && cfg.Stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return fmt.Errorf("creating stdin pipe: %w", err)
		}
		stdin = r
		go in.readCtl(rd, w)
	} else {
		go in.readCtl(rd, nil) // keep draining ctl so the host sees our end alive
	}
	if cfg.Mode == proto.ModeServe {
		return in.serve(cfg)
	}
	return in.runCommand(cfg, stdin)
}

// readCtl reads the host's frames after the Config: Stdin frames go to
// stdin (an empty one closes it), the rest is dropped.
func (in *initProc) readCtl(rd *proto.Reader, stdin *os.File) {
	for {
		f, err := rd.Next()
		if err != nil {
			var tl *proto.TooLargeError
			if errors.As(err, &tl) {
				continue
			}
			return
		}
		if f.Type == proto.Mount {
			in.mountRequest(f.Payload)
			continue
		}
		if f.Type != proto.Stdin || stdin == nil {
			continue
		}
		if len(f.Payload) == 0 {
			stdin.Close()
			stdin = nil
			continue
		}
		if _, err := stdin.Write(f.Payload); err != nil {
			// The command closed its input or exited: drop the rest.
			stdin.Close()
			stdin = nil
		}
	}
}

// mountRequest mounts the volumes of a Mount frame (a restored VM) and
// answers with a Mounted frame.
func (in *initProc) mountRequest(payload []byte) {
	vols, err := decodeMount(payload)
	if err == nil {
		err = mountVolumes("", vols)
	}
	reply := proto.MountedMsg{OK: err == nil}
	if err != nil {
		reply.Error = err.Error()
		in.logf("%v", err)
	}
	if err := in.sendJSON(proto.Mounted, reply); err != nil {
		fmt.Fprintf(in.console, "kiln-init: answering the mount request: %v\n", err)
	}
}

// mountEarly mounts proc, sysfs and devtmpfs in the initramfs.
func mountEarly() error {
	for _, m := range []struct{ src, dir, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", m.dir, err)
		}
		err := unix.Mount(m.src, m.dir, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, "")
		if err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mounting %s on %s: %w", m.fstype, m.dir, err)
		}
	}
	return nil
}

// loadModules loads each module listed in list, in order.
func loadModules(list string) error {
	b, err := os.ReadFile(list)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading module list: %w", err)
	}
	for _, p := range strings.Fields(string(b)) {
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("loading module: %w", err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("loading module %s: %w", filepath.Base(p), err)
		}
	}
	return nil
}

// poll calls f every pollStep until it succeeds or timeout passes.
func poll(timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(pollStep)
	}
}

// waitPort waits for the virtio-serial port called name and its device
// node, and returns the node's path.
func waitPort(name string) (string, error) {
	var port string
	err := poll(waitTimeout, func() (err error) {
		port, err = findPort(portClassDir, name)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("waiting for port %s (is the VM started with a virtserialport named %s?): %w", name, name, err)
	}
	dev := "/dev/" + port
	if err := poll(waitTimeout, func() error { _, err := os.Stat(dev); return err }); err != nil {
		return "", fmt.Errorf("waiting for port device: %w", err)
	}
	return dev, nil
}

// openPort opens a virtio-serial port in blocking mode: a blocking write
// returns only once the host has taken the data, so nothing written before
// power-off is lost.
func openPort(dev string) (*os.File, error) {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dev, err)
	}
	return os.NewFile(uintptr(fd), dev), nil
}

// configureSystem seeds the RNG, sets the clock and the hostname.
func configureSystem(c proto.RunConfig) error {
	if len(c.Entropy) > 0 {
		if err := seedRNG(c.Entropy); err != nil {
			return fmt.Errorf("seeding kernel RNG: %w", err)
		}
	}
	if c.TimeNS > 0 {
		tv := unix.NsecToTimeval(c.TimeNS)
		if err := unix.Settimeofday(&tv); err != nil {
			return fmt.Errorf("setting clock: %w", err)
		}
	}
	if err := unix.Sethostname([]byte(c.Hostname)); err != nil {
		return fmt.Errorf("setting hostname: %w", err)
	}
	return strictOvercommit()
}

// Memory accounting: with no swap, the kernel's default heuristic lets a
// process allocate past the guest's RAM and then thrashes on page cache
// (for minutes under TCG) before its OOM killer strikes. Strict accounting
// makes such an allocation fail at once (Python raises MemoryError, which the
// host reports as out of memory) and keeps the rest of the RAM for the
// kernel and the page cache.
const (
	overcommitMode  = "2"
	overcommitRatio = "85"
)

func strictOvercommit() error {
	for _, kv := range [][2]string{{"/proc/sys/vm/overcommit_ratio", overcommitRatio}, {"/proc/sys/vm/overcommit_memory", overcommitMode}} {
		if err := os.WriteFile(kv[0], []byte(kv[1]), 0); err != nil {
			return fmt.Errorf("setting %s: %w", kv[0], err)
		}
	}
	return nil
}

func seedRNG(entropy []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	info := randPoolInfo(entropy)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); e != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); e != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", e)
	}
	return nil
}

// mountRoot mounts the erofs root with its tmpfs directories, moves the
// early mounts into it and makes it the root.
func mountRoot(tmpfsMiB int) error {
	if err := poll(waitTimeout, func() error { _, err := os.Stat(rootDevice); return err }); err != nil {
		return fmt.Errorf("waiting for root device (is the rootfs attached as virtio-blk?): %w", err)
	}
	for _, d := range []string{imageRoot, newRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", d, err)
		}
	}
	// erofs is kiln's root filesystem; squashfs images exist for comparisons.
	if err := unix.Mount(rootDevice, imageRoot, "erofs", unix.MS_RDONLY, ""); err != nil {
		if err2 := unix.Mount(rootDevice, imageRoot, "squashfs", unix.MS_RDONLY, ""); err2 != nil {
			return fmt.Errorf("mounting rootfs %s (erofs: %v; squashfs: %w)", rootDevice, err, err2)
		}
	}
	if err := bindImage(imageRoot, newRoot); err != nil {
		return err
	}
	for _, t := range []struct {
		dir  string
		mode string
	}{{"/tmp", "1777"}, {"/run", "755"}, {"/var/tmp", "1777"}, {"/root", "700"}} {
		dir := newRoot + t.dir
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return fmt.Errorf("rootfs has no %s directory (the image build must create it)", t.dir)
		}
		opts := fmt.Sprintf("size=%dm,mode=%s", tmpfsMiB, t.mode)
		if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
			return fmt.Errorf("mounting tmpfs on %s: %w", t.dir, err)
		}
	}
	for _, d := range []string{"/proc", "/sys", "/dev"} {
		if fi, err := os.Stat(newRoot + d); err != nil || !fi.IsDir() {
			return fmt.Errorf("rootfs has no %s directory (the image build must create it)", d)
		}
		if err := unix.Mount(d, newRoot+d, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("moving %s into rootfs: %w", d, err)
		}
	}
	// POSIX shared memory and semaphores (multiprocessing) live in /dev/shm.
	shm := newRoot + "/dev/shm"
	if err := os.MkdirAll(shm, 0o1777); err != nil {
		return fmt.Errorf("creating /dev/shm: %w", err)
	}
	if err := unix.Mount("tmpfs", shm, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%dm,mode=1777", tmpfsMiB)); err != nil {
		return fmt.Errorf("mounting tmpfs on /dev/shm: %w", err)
	}
	if err := remountRoot(newRoot, true); err != nil {
		return err
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("switching root: %w", err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("switching root: moving rootfs to /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("switching root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("switching root: %w", err)
	}
	return nil
}

// bindImage makes root, the future guest root, a small tmpfs holding
// each top-level entry of the mounted image at image: directories and
// files bind-mounted (read-only, as the image is), symlinks copied. The
// guest sees the image as before, but a volume can later get a new
// top-level mountpoint (/data) although the image itself is read-only.
func bindImage(image, root string) error {
	if err := unix.Mount("tmpfs", root, "tmpfs", rootFlags, "size=1m,mode=755"); err != nil {
		return fmt.Errorf("mounting the root tmpfs: %w", err)
	}
	ents, err := os.ReadDir(image)
	if err != nil {
		return fmt.Errorf("reading the rootfs: %w", err)
	}
	for _, e := range ents {
		src, dst := image+"/"+e.Name(), root+"/"+e.Name()
		fi, err := os.Lstat(src)
		if err != nil {
			return fmt.Errorf("reading the rootfs: %w", err)
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(src)
			if err == nil {
				err = os.Symlink(target, dst)
			}
			if err != nil {
				return fmt.Errorf("copying the rootfs symlink /%s: %w", e.Name(), err)
			}
			continue
		case fi.IsDir():
			err = os.Mkdir(dst, fi.Mode().Perm())
		default:
			err = os.WriteFile(dst, nil, 0o444)
		}
		if err != nil {
			return fmt.Errorf("creating /%s on the root tmpfs: %w", e.Name(), err)
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mounting the rootfs's /%s: %w", e.Name(), err)
		}
	}
	return nil
}

// readOOMKill returns the kernel's oom_kill counter.
func readOOMKill() uint64 {
	f, err := os.Open("/proc/vmstat")
	if err != nil {
		return 0
	}
	defer f.Close()
	n, _ := parseOOMKill(f)
	return n
}

// startProcess resolves argv[0] in the config's PATH and starts it with
// the given stdin (nil: /dev/null), stdout and stderr.
func (in *initProc) startProcess(argv []string, c proto.RunConfig, stdin, stdout, stderr *os.File) (int, <-chan unix.WaitStatus, error) {
	env := environ(c.Env)
	pathEnv := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	bin, err := lookPath(argv[0], pathEnv)
	if err != nil {
		return 0, nil, &startError{err}
	}
	if stdin == nil {
		devnull, err := os.Open(os.DevNull)
		if err != nil {
			return 0, nil, fmt.Errorf("opening %s: %w", os.DevNull, err)
		}
		defer devnull.Close()
		stdin = devnull
	}
	var pid int
	ch, err := in.reaper.start(func() (int, error) {
		p, err := os.StartProcess(bin, argv, &os.ProcAttr{
			Dir:   c.Cwd,
			Env:   env,
			Files: []*os.File{stdin, stdout, stderr},
			Sys:   &syscall.SysProcAttr{Setsid: true},
		})
		if err != nil {
			return 0, err
		}
		pid = p.Pid
		_ = p.Release()
		return pid, nil
	})
	if err != nil {
		return 0, nil, &startError{fmt.Errorf("starting %s: %w", argv[0], err)}
	}
	return pid, ch, nil
}

// runCommand runs the configured command, relaying its output, and reports
// its exit. Errors are fatal init errors (reported by the caller).
func (in *initProc) runCommand(c proto.RunConfig, stdin *os.File) error {
	outR, outW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating pipe: %w", err)
	}
	oomBefore := readOOMKill()
	_, exited, err := in.startProcess(c.Argv, c, stdin, outW, errW)
	outW.Close()
	errW.Close()
	if stdin != nil {
		stdin.Close() // the command has its own copy
	}
	if err != nil {
		return err
	}
	in.event(proto.PhaseCommandStarted)
	var relays sync.WaitGroup
	relay := func(r *os.File, t proto.Type) {
		defer relays.Done()
		buf := make([]byte, chunkSize)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				if werr := in.send(t, buf[:n]); werr != nil {
					fmt.Fprintf(in.console, "kiln-init: relaying output: %v\n", werr)
				}
			}
			if err != nil {
				return
			}
		}
	}
	relays.Add(2)
	go relay(outR, proto.Stdout)
	go relay(errR, proto.Stderr)

	ws := <-exited
	exitedAt := uptimeMS()
	in.waitRelays(&relays, outR, errR)
	in.eventAt(proto.PhaseCommandExited, exitedAt)
	msg := exitMsg(ws)
	msg.OOM = readOOMKill() > oomBefore
	in.finish(msg)
	return nil
}

// waitRelays waits for the output relays to reach EOF. A background
// process that inherited the pipes can keep them open forever, so after
// drainTimeout the read ends are closed.
func (in *initProc) waitRelays(wg *sync.WaitGroup, files ...*os.File) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(drainTimeout):
		in.logf("command output still open %v after exit (background process?); closing it", drainTimeout)
		for _, f := range files {
			f.Close()
		}
		<-done
	}
}

func exitMsg(ws unix.WaitStatus) proto.ExitMsg {
	switch {
	case ws.Exited():
		return proto.ExitMsg{Code: ws.ExitStatus()}
	case ws.Signaled():
		return proto.ExitMsg{Code: 128 + int(ws.Signal()), Signal: unix.SignalName(ws.Signal())}
	default:
		return proto.ExitMsg{Code: 1, Error: fmt.Sprintf("unexpected wait status %#x", uint32(ws))}
	}
}

// serve runs the agent with its port, relaying its output as Log frames,
// and reports its exit.
func (in *initProc) serve(c proto.RunConfig) error {
	port, err := waitPort(proto.AgentPort)
	if err != nil {
		return err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating pipe: %w", err)
	}
	oomBefore := readOOMKill()
	argv := agentCommand(c, port)
	_, exited, err := in.startProcess(argv, c, nil, outW, outW)
	outW.Close()
	if err != nil {
		return err
	}
	var relays sync.WaitGroup
	relays.Add(1)
	go func() {
		defer relays.Done()
		_ = splitLines(outR, maxLogLine, func(line string) {
			if err := in.send(proto.Log, []byte(line)); err != nil {
				fmt.Fprintf(in.console, "kiln-init: relaying agent log: %v\n", err)
			}
		})
	}()
	ws := <-exited
	in.waitRelays(&relays, outR)
	msg := exitMsg(ws)
	msg.OOM = readOOMKill() > oomBefore
	if msg.Code != 0 || msg.Signal != "" {
		in.logf("agent exited: code %d %s", msg.Code, msg.Signal)
	}
	in.finish(msg)
	return nil
}

// reaper reaps every child of PID 1 (including orphans) and hands the
// status of processes started through it to their waiter.
type reaper struct {
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
}

func startReaper() *reaper {
	r := &reaper{waiters: map[int]chan unix.WaitStatus{}}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, unix.SIGCHLD)
	go r.loop(sig)
	return r
}

// start runs startFn with the reaper locked so that a fast-exiting child
// cannot be reaped before its waiter is registered.
func (r *reaper) start(startFn func() (int, error)) (<-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := startFn()
	if err != nil {
		return nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[pid] = ch
	return ch, nil
}

func (r *reaper) loop(sig <-chan os.Signal) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.ECHILD):
			<-sig // no children: wait until one exits
			continue
		case err != nil:
			time.Sleep(10 * time.Millisecond)
			continue
		}
		r.mu.Lock()
		if ch, ok := r.waiters[pid]; ok {
			ch <- ws
			delete(r.waiters, pid)
		}
		r.mu.Unlock()
	}
}
