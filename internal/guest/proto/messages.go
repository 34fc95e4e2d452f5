package proto

// HelloMsg is the payload of a Hello frame.
type HelloMsg struct {
	Who      string  `json:"who"`
	Version  string  `json:"version,omitempty"`
	UptimeMS float64 `json:"uptime_ms"`
	// Features lists what this init can do beyond protocol version 1
	// (FeatureVolumes), so a host can refuse what an older image's init
	// would silently ignore.
	Features []string `json:"features,omitempty"`
}

// FeatureVolumes: init mounts RunConfig.Volumes and answers Mount frames.
const FeatureVolumes = "volumes"

// RunConfig is the payload of the Config frame the host sends to init.
type RunConfig struct {
	Mode      string            `json:"mode"` // "run" or "serve"
	Argv      []string          `json:"argv,omitempty"`
	Env       map[string]string `json:"env,omitempty"`
	Cwd       string            `json:"cwd,omitempty"`
	Hostname  string            `json:"hostname,omitempty"`
	Entropy   []byte            `json:"entropy,omitempty"`
	TimeNS    int64             `json:"time_ns,omitempty"`
	AgentArgv []string          `json:"agent_argv,omitempty"`
	Preload   []string          `json:"preload,omitempty"`
	TmpfsMiB  int               `json:"tmpfs_mib,omitempty"`
	// Stdin, in run mode, makes the command's fd 0 the host's Stdin frames
	// on the ctl port (an empty frame ends the input); else /dev/null.
	Stdin bool `json:"stdin,omitempty"`
	// Volumes are host directories init mounts before it starts the
	// command or the agent (a cold boot). A restored VM gets them in a
	// Mount frame instead, since a snapshot is taken with none mounted.
	Volumes []Volume `json:"volumes,omitempty"`
}

// Volume is one host directory shared into the guest: the 9p mount tag of
// its device slot (VolumeTag), where it appears in the guest and whether
// it is read-only.
type Volume struct {
	Tag      string `json:"tag"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"ro,omitempty"`
}

// MountMsg is the payload of a Mount frame: the host asks init to mount
// these volumes (a restored VM, right after its state is loaded).
type MountMsg struct {
	Volumes []Volume `json:"volumes"`
}

// MountedMsg is init's answer to a Mount frame: every volume is mounted,
// or none is and Error says why.
type MountedMsg struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// Modes of a RunConfig.
const (
	ModeRun   = "run"
	ModeServe = "serve"
)

// ExitMsg is the payload of an Exit frame.
type ExitMsg struct {
	Code   int    `json:"code"`
	Signal string `json:"signal,omitempty"`
	Error  string `json:"error,omitempty"`
	OOM    bool   `json:"oom,omitempty"`
}

// EventMsg is the payload of an Event frame.
type EventMsg struct {
	Phase    string  `json:"phase"`
	UptimeMS float64 `json:"uptime_ms"`
}

// Phases reported in Event frames.
const (
	PhaseRootfsMounted  = "rootfs_mounted"
	PhaseCommandStarted = "command_started"
	PhaseCommandExited  = "command_exited"
)

// ReadyMsg is the payload of the agent's Ready frame.
type ReadyMsg struct {
	Python    string            `json:"python"`
	Preloaded []string          `json:"preloaded"`
	PreloadMS float64           `json:"preload_ms"`
	Errors    map[string]string `json:"errors,omitempty"`
	// Batch says the agent takes Tasks frames (agents from images built
	// before them do not).
	Batch bool `json:"batch,omitempty"`
}

// ReseedMsg is the payload of a Reseed frame.
type ReseedMsg struct {
	Entropy []byte `json:"entropy"`
	TimeNS  int64  `json:"time_ns"`
}

// ReseededMsg is the payload of a Reseeded frame.
type ReseededMsg struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// Batch is ReadyMsg.Batch, for a clone (whose Ready frame was read
	// before its snapshot was saved).
	Batch bool `json:"batch,omitempty"`
}
