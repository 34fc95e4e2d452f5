package proto

// HelloMsg is the payload of a Hello frame.
type HelloMsg struct {
	Who      string  `json:"who"`
	Version  string  `json:"version,omitempty"`
	UptimeMS float64 `json:"uptime_ms"`
}

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
}
