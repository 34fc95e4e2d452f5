package proto

// Facts of the host↔guest boundary that both sides build on. They are
// written here once; the host (package vm, package build) and the guest
// (package pid1, the agent's command line) use these names.
const (
	// CtlPort is the virtio-serial port between the host and kiln-init:
	// Hello, Config, Event, Log, Stdout/Stderr of run mode, Exit.
	CtlPort = "kiln.ctl"
	// AgentPort is the virtio-serial port between the host and the Python
	// agent: Ready, Task, Result, Reseed.
	AgentPort = "kiln.agent"

	// ModulesList is the initramfs file that lists, one path per line and
	// in dependency order, the kernel modules kiln-init loads.
	ModulesList = "/etc/kiln/modules"
	// AgentPath is where every image carries the agent.
	AgentPath = "/usr/lib/kiln/agent.py"

	// KernelCmdline is the kernel command line of every kiln VM: kernel
	// messages on the first serial port, an immediate reboot (which the
	// VMM turns into an exit, so a panic ends the VM) and little noise.
	KernelCmdline = "console=ttyS0 panic=-1 loglevel=3 quiet random.trust_cpu=on"
)
