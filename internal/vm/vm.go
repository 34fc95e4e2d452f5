// Package vm owns one kiln VM's host-side life: boot or restore through a vmm driver, the control channel to kiln-init, snapshots, timings and why the VM died.
//
// Lifecycle:
//   - New checks a Config and its options and prepares the machine through
//     the vmm driver the Config names; no process runs yet.
//   - Start boots the kernel and sends kiln-init its configuration, or, with
//     WithSnapshot, starts the VMM waiting for a snapshot and loads it. It
//     returns once the guest runs: the command (WithCommand) or the agent
//     (WithAgent) is starting then.
//   - From Start on, one goroutine reads the control port: a run-mode
//     command's output goes to the writers given to WithCommand as it
//     arrives, guest log lines go to the logger, boot events to Timings,
//     and init's Exit frame is kept for Wait and Death.
//   - Config.Volumes are mounted by kiln-init before the command or agent
//     starts (a boot) or on request right after the state is loaded (a
//     restore); a snapshot source mounts none.
//   - Wait returns a run-mode command's exit status once the guest powered
//     off. SaveSnapshot saves a running guest for WithSnapshot.
//   - Close kills the VMM and releases every resource. It is idempotent and
//     may be called at any time from any goroutine; blocked calls return.
//
// Concurrency: Timings, Death, Done, Pid, Agent and Close may be called from
// any goroutine. Start, Wait and SaveSnapshot belong to the goroutine that
// owns the VM and are called one at a time.
package vm

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/snapshot"
	"github.com/kiln-dev/kiln/internal/vmm"
	_ "github.com/kiln-dev/kiln/internal/vmm/drivers" // every driver, chosen by Config.VMM
)

// Config says which image to run and on what machine. The zero values of
// the sizing fields take the image's defaults.
type Config struct {
	Image     *image.Image // opened and verified (image.OpenVerified)
	MemoryMiB int          // 0: the image's memory
	VCPUs     int          // 0: the image's vCPUs
	Accel     vmm.Accel    // "": the driver detects KVM, else TCG
	VMM       string       // VMM driver name; "": vmm.DefaultDriver
	Binary    string       // VMM program; "": the driver's default
	// Machine is the machine type (vmm.MachineQ35 or vmm.MachineMicrovm);
	// "": the one the image's kernel boots fastest on (MachineFor).
	Machine string
	// Volumes are host directories the VM mounts (see Volume): at boot,
	// or after a restore. A snapshot source mounts none, so snapshots
	// and their keys do not depend on them.
	Volumes []Volume
	Log     *slog.Logger // nil discards
}

// Validate reports a Config that cannot describe a VM.
func (c *Config) Validate() error {
	switch {
	case c.Image == nil || c.Image.Manifest == nil:
		return errors.New("vm: no image (open it with image.OpenVerified)")
	case c.MemoryMiB < 0:
		return fmt.Errorf("vm: memory %d MiB: must not be negative", c.MemoryMiB)
	case c.VCPUs < 0:
		return fmt.Errorf("vm: %d vCPUs: must not be negative", c.VCPUs)
	case c.Machine != "" && !slices.Contains(vmm.Machines, c.Machine):
		return fmt.Errorf("vm: unknown machine type %q (want one of %v)", c.Machine, vmm.Machines)
	case c.Machine == vmm.MachineMicrovm && c.Image.Manifest.KernelKind() != "minimal":
		return fmt.Errorf("vm: image %s has the %s kernel, which cannot boot on a microvm (no virtio-mmio): use machine %s", c.Image.Manifest.Name, c.Image.Manifest.KernelKind(), vmm.MachineQ35)
	}
	return c.checkVolumes()
}

// Resources returns the guest memory and vCPU count: the Config's, else
// the image's. This is the one place that rule is written.
func (c *Config) Resources() (memMiB, vcpus int) {
	memMiB, vcpus = c.Image.Manifest.MemoryMiB, c.Image.Manifest.VCPUs
	if c.MemoryMiB > 0 {
		memMiB = c.MemoryMiB
	}
	if c.VCPUs > 0 {
		vcpus = c.VCPUs
	}
	return memMiB, vcpus
}

// MachineFor returns the machine type that runs an image best: a microvm
// for kiln's own kernel (virtio-mmio and ACPI built in, booted through its
// PVH entry, no PCI to probe), q35 for any other kernel (Debian's loads
// virtio-pci as a module and has no virtio-mmio).
func MachineFor(m *image.Manifest) string {
	if m.KernelKind() == "minimal" {
		return vmm.MachineMicrovm
	}
	return vmm.MachineQ35
}

// machineCmdline is what a machine type adds to proto.KernelCmdline.
var machineCmdline = map[string]string{
	vmm.MachineMicrovm: microvmCmdline,
}

// microvmCmdline: a microvm has no PCI bus; pci=off skips looking for
// one.
const microvmCmdline = "pci=off"

// machine returns the machine type of the VM: the Config's, else the
// image's (MachineFor).
func (c *Config) machine() string {
	if c.Machine != "" {
		return c.Machine
	}
	return MachineFor(c.Image.Manifest)
}

func (c *Config) logger() *slog.Logger {
	if c.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Log
}

// Option chooses what a VM runs and how it starts.
type Option func(*VM)

// Stdio connects a guest command's fds 0, 1 and 2 to the caller. Stdout
// and Stderr receive output as it is written (nil discards it); Stdin,
// when set, is read until it ends and given to the command, which gets
// /dev/null otherwise. A Stdin reader that blocks after the command ended
// keeps one goroutine reading it until its next Read returns.
type Stdio struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// WithCommand boots the VM in run mode: kiln-init runs argv with the
// image's environment plus env, its fds connected to stdio, and powers off
// when it exits; see Wait.
func WithCommand(argv []string, env map[string]string, stdio Stdio) Option {
	return func(v *VM) {
		v.run = &proto.RunConfig{Mode: proto.ModeRun, Argv: argv, Env: mergeEnv(v.cfg.Image.Manifest.Env, env), Hostname: v.cfg.Image.Manifest.Name, Stdin: stdio.Stdin != nil}
		v.stdin, v.stdout, v.stderr = stdio.Stdin, orDiscard(stdio.Stdout), orDiscard(stdio.Stderr)
	}
}

// WithAgent boots the VM in serve mode: kiln-init starts the image's agent,
// which imports preload and then speaks on Agent().
func WithAgent(preload []string) Option {
	return func(v *VM) {
		v.run = &proto.RunConfig{Mode: proto.ModeServe, Env: v.cfg.Image.Manifest.Env, Hostname: "kiln", AgentArgv: v.cfg.Image.Manifest.Agent, Preload: preload}
	}
}

// WithSnapshot restores the VM from a snapshot instead of booting it: the
// RAM file is mapped private (copy-on-write, never modified) and the device
// state is loaded from state. What runs is what ran when it was saved.
func WithSnapshot(ram, state string) Option {
	return func(v *VM) { v.restoreRAM, v.restoreState = ram, state }
}

// WithSnapshotSource backs guest RAM with the shared file ram, so that
// SaveSnapshot only has to save the device state.
func WithSnapshotSource(ram string) Option {
	return func(v *VM) { v.sourceRAM = ram }
}

func mergeEnv(base, extra map[string]string) map[string]string {
	if len(extra) == 0 {
		return base
	}
	out := make(map[string]string, len(base)+len(extra))
	for k, val := range base {
		out[k] = val
	}
	for k, val := range extra {
		out[k] = val
	}
	return out
}

func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// maxCtlFrame bounds control-port frames (output chunks, logs, events).
const maxCtlFrame = 1 << 20

// VM is one virtual machine; see the package comment for its rules.
type VM struct {
	cfg Config
	log *slog.Logger

	run                      *proto.RunConfig // nil when restoring
	stdin                    io.Reader
	stdout, stderr           io.Writer
	restoreRAM, restoreState string
	sourceRAM                string
	vols                     []Volume // mounted by this VM (none for a snapshot source)
	emptyDir                 string   // the unused volume slots' directory, removed by Close

	drv     vmm.Driver
	mc      vmm.Config
	machine vmm.Machine // replaced only by Start's CPU fallback, under mu
	memMiB  int
	ctl     net.Conn
	ctlR    *proto.Reader

	mu      sync.Mutex
	timings Timings
	exit    *proto.ExitMsg
	exited  chan struct{} // closed when init's Exit frame arrived
	ctlDone chan struct{} // closed when the control port reader ended

	closeOnce sync.Once
	closed    bool // under mu
}

// New prepares a VM of cfg; see the options for what it runs. Exactly one
// of WithCommand, WithAgent and WithSnapshot is needed; WithSnapshotSource
// goes with WithAgent.
func New(cfg Config, opts ...Option) (*VM, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	v := &VM{cfg: cfg, log: cfg.logger(), exited: make(chan struct{}), ctlDone: make(chan struct{})}
	for _, o := range opts {
		o(v)
	}
	restore := v.restoreState != ""
	switch {
	case restore && v.run != nil:
		return nil, errors.New("vm: a restored VM runs what its snapshot ran: WithSnapshot excludes WithCommand and WithAgent")
	case restore && v.sourceRAM != "":
		return nil, errors.New("vm: WithSnapshot and WithSnapshotSource exclude each other")
	case !restore && v.run == nil:
		return nil, errors.New("vm: nothing to run: give WithCommand, WithAgent or WithSnapshot")
	case v.sourceRAM != "" && v.run.Mode != proto.ModeServe:
		return nil, errors.New("vm: a snapshot source runs the agent: WithSnapshotSource goes with WithAgent")
	}
	if v.sourceRAM == "" {
		v.vols = cfg.Volumes
		if v.run != nil {
			v.run.Volumes = v.protoVolumes()
		}
	}
	ok := false
	defer func() {
		if !ok {
			v.removeEmptyDir()
		}
	}()
	mc, err := v.machineConfig()
	if err != nil {
		return nil, err
	}
	if host := vmm.HostMemoryMiB(); host > 0 && mc.MemoryMiB > host {
		return nil, fmt.Errorf("a VM of %d MiB needs more memory than this host has (%d MiB): give it less with --memory (or memory in kiln.toml)", mc.MemoryMiB, host)
	}
	if cpus := vmm.HostCPUs(); mc.VCPUs > cpus {
		v.log.Warn(fmt.Sprintf("the VM has %d vCPUs but this host has %d CPUs: it will run slower than with %d (--vcpus)", mc.VCPUs, cpus, cpus))
	}
	if v.drv, err = vmm.Lookup(cfg.VMM); err != nil {
		return nil, err
	}
	v.mc = mc
	if v.machine, err = v.drv.New(mc); err != nil {
		return nil, err
	}
	ok = true
	return v, nil
}

// machineConfig is the vmm configuration that runs the image: its kernel
// and initramfs, the rootfs attached read-only as a byte range of the image
// file, and the two virtio-serial ports.
func (v *VM) machineConfig() (vmm.Config, error) {
	img := v.cfg.Image
	kernel, initrd, err := img.BootFiles()
	if err != nil {
		return vmm.Config{}, fmt.Errorf("extracting kernel and initramfs: %w", err)
	}
	root, ok := img.Part(image.PartRootfs)
	if !ok {
		return vmm.Config{}, fmt.Errorf("image %s has no rootfs part: %w", img.Path, image.ErrCorrupt)
	}
	mem, cpus := v.cfg.Resources()
	v.memMiB = mem
	machine := v.cfg.machine()
	cmdline := proto.KernelCmdline
	if extra := machineCmdline[machine]; extra != "" {
		cmdline += " " + extra
	}
	mc := vmm.Config{
		Kernel:    kernel,
		Initrd:    initrd,
		Cmdline:   cmdline,
		Machine:   machine,
		MemoryMiB: mem,
		VCPUs:     cpus,
		Accel:     v.cfg.Accel,
		Binary:    v.cfg.Binary,
		Disks:     []vmm.Disk{{Path: img.Path, Offset: root.Offset, Size: root.Size, ReadOnly: true}},
		Ports:     []string{proto.CtlPort, proto.AgentPort},
		Log:       v.log,
	}
	if mc.Shares, err = v.shares(); err != nil {
		return vmm.Config{}, err
	}
	switch {
	case v.restoreState != "":
		mc.RAMFile, mc.Incoming = v.restoreRAM, true
	case v.sourceRAM != "":
		mc.RAMFile, mc.RAMShared = v.sourceRAM, true
	}
	return mc, nil
}

// SnapshotKey returns the key of the snapshot a VM of cfg restores from
// after importing preload: the image, its kernel, the VMM's version, the
// accelerator, memory, vCPUs and the driver's fingerprint of the machine a
// restore builds.
func SnapshotKey(ctx context.Context, cfg Config, preload []string) (snapshot.Key, error) {
	v, err := New(cfg, WithSnapshot("<ram>", "<state>"))
	if err != nil {
		return snapshot.Key{}, err
	}
	defer v.Close()
	ver, err := v.m().Version(ctx)
	if err != nil {
		return snapshot.Key{}, err
	}
	mem, cpus := cfg.Resources()
	return snapshot.Key{
		ImageDigest: cfg.Image.Digest,
		Kernel:      cfg.Image.Manifest.Kernel.Version,
		VMM:         ver,
		Accel:       string(v.m().Accel()),
		MemoryMiB:   mem,
		VCPUs:       cpus,
		Devices:     v.m().Fingerprint(),
		Preload:     preload,
	}, nil
}

// Start boots or restores the VM (see the package comment) and returns
// once the guest runs. ctx bounds only the start; when it ends first, the
// VM is closed and ctx's error returned. On any error the VM is closed.
func (v *VM) Start(ctx context.Context) (err error) {
	t0 := time.Now()
	v.mu.Lock()
	v.timings.Start = t0
	v.mu.Unlock()
	defer func() {
		if err != nil {
			v.Close()
			if ctx.Err() != nil {
				err = ctx.Err()
			}
		}
	}()
	if err := v.m().Start(ctx); err != nil {
		if !errors.Is(err, vmm.ErrCPUModel) || v.mc.CPU != "" || ctx.Err() != nil {
			return fmt.Errorf("starting the VM: %w", err)
		}
		// KVM cannot present the host's CPU here: once more with a
		// named model.
		v.log.Warn(fmt.Sprintf("the VMM refused its default CPU model; retrying with %s", vmm.FallbackCPU), "error", err)
		if err := v.fallbackCPU(); err != nil {
			return fmt.Errorf("starting the VM: %w", err)
		}
		if err := v.m().Start(ctx); err != nil {
			return fmt.Errorf("starting the VM with -cpu %s: %w", vmm.FallbackCPU, err)
		}
	}
	v.phase(&v.timings.VMMStarted)
	v.ctl = v.m().Port(proto.CtlPort)
	v.ctlR = proto.NewReader(v.ctl, maxCtlFrame)
	if v.restoreState != "" {
		if err := v.m().LoadState(ctx, v.restoreState); err != nil {
			return fmt.Errorf("loading the VM state: %w", err)
		}
		v.phase(&v.timings.StateLoaded)
		if len(v.vols) > 0 {
			if err := v.mountVolumes(ctx); err != nil {
				return err
			}
			v.phase(&v.timings.VolumesMounted)
		}
	} else if err := v.handshake(ctx); err != nil {
		return err
	}
	go v.readCtl()
	if v.stdin != nil {
		go v.pumpStdin()
	}
	return nil
}

// m returns the VM's machine.
func (v *VM) m() vmm.Machine {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.machine
}

// fallbackCPU replaces the machine, whose start failed on its default CPU
// model, with one of vmm.FallbackCPU; a VM closed meanwhile stays closed.
func (v *VM) fallbackCPU() error {
	mc := v.mc
	mc.CPU = vmm.FallbackCPU
	nm, err := v.drv.New(mc)
	if err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return vmm.ErrClosed
	}
	v.mc, v.machine = mc, nm
	return nil
}

// pumpStdin sends the command's input to kiln-init as Stdin frames and
// ends it with an empty one.
func (v *VM) pumpStdin() {
	buf := make([]byte, 32<<10)
	for {
		n, err := v.stdin.Read(buf)
		if n > 0 {
			if proto.Write(v.ctl, proto.Stdin, buf[:n]) != nil {
				return
			}
		}
		if err != nil {
			_ = proto.Write(v.ctl, proto.Stdin, nil)
			return
		}
	}
}

// Entropy returns n fresh random bytes for seeding a guest.
func Entropy(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// handshake waits for init's Hello and sends it the run configuration.
func (v *VM) handshake(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { v.Close() })
	defer stop()
	for {
		f, err := v.ctlR.Next()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("waiting for the guest init: %w", v.Death("kiln-init", err))
		}
		switch f.Type {
		case proto.Hello:
			v.mu.Lock()
			v.timings.InitStarted = time.Since(v.timings.Start)
			var h proto.HelloMsg
			if err := json.Unmarshal(f.Payload, &h); err == nil && h.UptimeMS > 0 {
				if k := v.timings.InitStarted - time.Duration(h.UptimeMS*float64(time.Millisecond)); k > 0 {
					v.timings.KernelStarted = k
				}
			}
			v.mu.Unlock()
			if len(v.run.Volumes) > 0 && !slices.Contains(h.Features, proto.FeatureVolumes) {
				return errOldInit
			}
			rc := *v.run
			rc.Entropy = Entropy(64)
			rc.TimeNS = time.Now().UnixNano()
			if err := proto.WriteJSON(v.ctl, proto.Config, rc); err != nil {
				return fmt.Errorf("sending the run configuration: %w", v.Death("kiln-init", err))
			}
			return nil
		case proto.Log:
			v.log.Debug("guest", "line", string(f.Payload))
		default:
			v.log.Debug("unexpected frame before hello", "type", f.Type)
		}
	}
}

// readCtl reads the control port until it ends.
func (v *VM) readCtl() {
	defer close(v.ctlDone)
	for {
		f, err := v.ctlR.Next()
		if err != nil {
			var tl *proto.TooLargeError
			if errors.As(err, &tl) {
				v.log.Warn("dropped an oversized control frame", "error", err)
				continue
			}
			return
		}
		switch f.Type {
		case proto.Stdout:
			if v.stdout != nil {
				_, _ = v.stdout.Write(f.Payload)
			}
		case proto.Stderr:
			if v.stderr != nil {
				_, _ = v.stderr.Write(f.Payload)
			}
		case proto.Log:
			v.log.Debug("guest", "line", string(f.Payload))
		case proto.Event:
			v.event(f)
		case proto.Exit:
			var e proto.ExitMsg
			if err := json.Unmarshal(f.Payload, &e); err != nil {
				v.log.Warn("undecodable exit frame", "error", err)
				continue
			}
			v.mu.Lock()
			first := v.exit == nil
			if first {
				v.exit = &e
				if v.timings.CommandExited == 0 && v.run != nil && v.run.Mode == proto.ModeRun {
					v.timings.CommandExited = time.Since(v.timings.Start)
				}
			}
			v.mu.Unlock()
			if first {
				close(v.exited)
			}
		}
	}
}

func (v *VM) event(f proto.Frame) {
	var e proto.EventMsg
	if json.Unmarshal(f.Payload, &e) != nil {
		return
	}
	switch e.Phase {
	case proto.PhaseRootfsMounted:
		v.phase(&v.timings.RootfsMounted)
	case proto.PhaseCommandStarted:
		v.phase(&v.timings.CommandStarted)
	case proto.PhaseCommandExited:
		v.phase(&v.timings.CommandExited)
	}
}

// phase records now as the time of the phase p points into v.timings.
func (v *VM) phase(p *time.Duration) {
	v.mu.Lock()
	*p = time.Since(v.timings.Start)
	v.mu.Unlock()
}

// Wait waits for a run-mode command to exit and for the guest to power
// off, and returns how the command ended. When ctx ends first the VM is
// closed and ctx's error returned; when the guest dies without an exit
// report, the error is a *Death.
func (v *VM) Wait(ctx context.Context) (proto.ExitMsg, error) {
	select {
	case <-v.exited:
	case <-v.ctlDone:
	case <-ctx.Done():
		v.Close()
		return proto.ExitMsg{}, ctx.Err()
	}
	e, ok := v.Exit()
	if !ok {
		if ctx.Err() != nil {
			return proto.ExitMsg{}, ctx.Err()
		}
		return proto.ExitMsg{}, fmt.Errorf("running the command: %w", v.Death("the command", nil))
	}
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-v.m().Done():
	case <-t.C:
		v.log.Warn("guest did not power off after the command exited; killing it")
	case <-ctx.Done():
	}
	// The control port may still hold output written before the exit:
	// it ends when the VMM is gone.
	v.Close()
	<-v.ctlDone
	return e, nil
}

// Exit returns init's Exit report, if it arrived.
func (v *VM) Exit() (proto.ExitMsg, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.exit == nil {
		return proto.ExitMsg{}, false
	}
	return *v.exit, true
}

// Agent returns the host end of the agent's port (valid after Start).
func (v *VM) Agent() net.Conn { return v.m().Port(proto.AgentPort) }

// Done is closed when the VMM process has exited.
func (v *VM) Done() <-chan struct{} { return v.m().Done() }

// Pid returns the VMM's process id, or 0 before Start.
func (v *VM) Pid() int { return v.m().Pid() }

// Accel returns the accelerator the VM runs on.
func (v *VM) Accel() vmm.Accel { return v.m().Accel() }

// MemoryMiB returns the guest's memory size.
func (v *VM) MemoryMiB() int { return v.memMiB }

// Restored reports whether the VM was restored from a snapshot.
func (v *VM) Restored() bool { return v.restoreState != "" }

// Timings returns the phases reached so far.
func (v *VM) Timings() Timings {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.timings
}

// SaveSnapshot saves the running guest so that WithSnapshot(ram, state)
// restores it; the VM is paused afterwards and is closed by the caller.
// A snapshot source's RAM already lives in its shared file, which must be
// ram. A restored clone maps its RAM privately, so the RAM is streamed into
// state and ram is written as a sparse file of the right size (all zeros).
// Other VMs cannot be saved.
func (v *VM) SaveSnapshot(ctx context.Context, ram, state string) error {
	switch {
	case v.sourceRAM != "":
		if ram != v.sourceRAM {
			return fmt.Errorf("saving a snapshot: the RAM of this VM lives in %s, not %s", v.sourceRAM, ram)
		}
	case v.restoreState != "":
		fi, err := os.Stat(v.restoreRAM)
		if err != nil {
			return fmt.Errorf("saving a snapshot: %w", err)
		}
		if err := sparseFile(ram, fi.Size()); err != nil {
			return fmt.Errorf("saving a snapshot: %w", err)
		}
	default:
		return errors.New("saving a snapshot needs a VM with file-backed RAM: a snapshot source or a VM restored from a snapshot")
	}
	if len(v.vols) > 0 {
		// QEMU refuses to migrate a mounted virtio-9p device.
		return errors.New("saving a snapshot: the VM has volumes mounted, which QEMU cannot save; checkpoint a VM without --volume")
	}
	if err := v.m().SaveState(ctx, state); err != nil {
		return fmt.Errorf("saving the VM state: %w", err)
	}
	return nil
}

func sparseFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}

// Death explains why a guest stopped talking: init's Exit report (the
// process that ended, its status, whether the kernel's OOM killer struck),
// the VMM's exit, and the last console lines (kernel panics). Its Error
// names who, the guest process the caller was talking to.
type Death struct {
	Who       string         // "kiln-init", "the agent", "the command"
	Exit      *proto.ExitMsg // init's Exit frame, when it arrived
	VMMExited bool           // the VMM process is gone
	VMM       error          // why it exited (nil: a clean power-off)
	Cause     error          // what the caller saw (EOF on a port, ...)
	Console   string         // the console's last lines
}

// OOM reports whether the guest kernel's OOM killer ended the process.
func (d *Death) OOM() bool { return d.Exit != nil && d.Exit.OOM }

func (d *Death) Error() string {
	var b strings.Builder
	switch {
	case d.Exit != nil && d.Exit.Error != "":
		fmt.Fprintf(&b, "%s exited: %s", d.Who, d.Exit.Error)
	case d.Exit != nil:
		fmt.Fprintf(&b, "%s exited with status %d", d.Who, d.Exit.Code)
		if d.Exit.Signal != "" {
			fmt.Fprintf(&b, " (signal %s)", d.Exit.Signal)
		}
	case d.VMMExited:
		b.WriteString("the VM died")
	default:
		b.WriteString("the VM stopped answering")
	}
	if d.OOM() {
		b.WriteString(" (the guest ran out of memory)")
	}
	if d.VMM != nil {
		fmt.Fprintf(&b, " (VMM: %v)", d.VMM)
	}
	if d.Cause != nil && d.Exit == nil && !d.VMMExited {
		fmt.Fprintf(&b, " (%v)", d.Cause)
	}
	b.WriteString(consoleTail(d.Console))
	return b.String()
}

func (d *Death) Unwrap() error { return d.Cause }

// deathWait bounds how long Death waits for init's report or the VMM's exit.
const deathWait = 3 * time.Second

// Death waits briefly for init's Exit report or the VMM's exit and says
// why who (the guest process the caller talked to) is gone; cause is what
// the caller saw.
func (v *VM) Death(who string, cause error) *Death {
	t := time.NewTimer(deathWait)
	defer t.Stop()
	select {
	case <-v.exited:
	case <-v.m().Done():
		// The report, if init sent one, is in the port's buffer.
		select {
		case <-v.ctlDone:
		case <-t.C:
		}
	case <-t.C:
	}
	d := &Death{Who: who, Cause: cause}
	if e, ok := v.Exit(); ok {
		d.Exit = &e
	}
	select {
	case <-v.m().Done():
		d.VMMExited = true
		if err := v.m().Wait(); err != nil && !errors.Is(err, vmm.ErrClosed) {
			d.VMM = err
		}
	default:
	}
	d.Console = string(v.m().Console())
	return d
}

func consoleTail(s string) string {
	s = strings.TrimSpace(s)
	if s == "" {
		return ""
	}
	lines := strings.Split(s, "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return "; last console lines:\n  " + strings.Join(lines, "\n  ")
}

// Close kills the VM and releases its resources. It is idempotent.
func (v *VM) Close() error {
	var err error
	v.closeOnce.Do(func() {
		v.mu.Lock()
		v.closed = true
		m := v.machine
		v.mu.Unlock()
		err = m.Close()
		v.removeEmptyDir()
	})
	return err
}

func (v *VM) removeEmptyDir() {
	if v.emptyDir != "" {
		os.Remove(v.emptyDir)
	}
}
