package vm

import "time"

// Timings are the host-observed phases of one VM's start. Zero durations
// mean the phase was not reached.
type Timings struct {
	Start          time.Time     // Start was called (before the VMM process)
	VMMStarted     time.Duration // VMM process running, monitor connected
	KernelStarted  time.Duration // estimated: init's Hello arrival minus the guest uptime it reports
	InitStarted    time.Duration // init's Hello arrived
	RootfsMounted  time.Duration
	CommandStarted time.Duration
	CommandExited  time.Duration
	StateLoaded    time.Duration // restore: device state loaded and the guest resumed
	VolumesMounted time.Duration // restore: init mounted the volumes
}

// Phase is one named point in time since Timings.Start.
type Phase struct {
	Name  string        `json:"name"`
	Since time.Duration `json:"since_ns"`
}

// Phases lists the reached phases in order.
func (t Timings) Phases() []Phase {
	return Reached(
		Phase{"vmm_started", t.VMMStarted}, Phase{"kernel_started", t.KernelStarted},
		Phase{"init_started", t.InitStarted}, Phase{"rootfs_mounted", t.RootfsMounted},
		Phase{"command_started", t.CommandStarted}, Phase{"command_exited", t.CommandExited},
		Phase{"state_loaded_resumed", t.StateLoaded}, Phase{"volumes_mounted", t.VolumesMounted},
	)
}

// Reached returns the phases with a positive time, in the order given.
func Reached(all ...Phase) []Phase {
	var out []Phase
	for _, p := range all {
		if p.Since > 0 {
			out = append(out, p)
		}
	}
	return out
}
