package slurm

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// Config holds the [slurm] table of serve.toml. Keys (TOML tags) follow
// Parsl's SlurmProvider, because that is what HPC users already write.
// Validate fills the defaults.
type Config struct {
	Partition  string `toml:"partition"`
	Account    string `toml:"account"`
	QOS        string `toml:"qos"`
	Constraint string `toml:"constraint"`
	// Walltime is the pilot's time limit in a form sbatch --time takes:
	// HH:MM:SS, D-HH:MM:SS, D-HH:MM, D-HH, MM:SS or minutes. Default
	// "01:00:00".
	Walltime      string `toml:"walltime"`
	NodesPerBlock int    `toml:"nodes_per_block"` // 0: 1
	CPUsPerTask   int    `toml:"cpus_per_task"`   // 0: not set
	Mem           string `toml:"mem"`             // sbatch --mem, e.g. "8G"; "": not set
	InitBlocks    int    `toml:"init_blocks"`
	MinBlocks     int    `toml:"min_blocks"`
	MaxBlocks     int    `toml:"max_blocks"` // 0: 1
	// MaxIdle is how long a block may be idle before it is cancelled:
	// seconds (a TOML number) or a Go duration string ("2m"). 0: 120 s.
	MaxIdle Duration `toml:"max_idle"`
	// WorkerInit is shell run before the worker (module load ...).
	WorkerInit string `toml:"worker_init"`
	// SchedulerOptions are extra "#SBATCH ..." lines, copied verbatim.
	SchedulerOptions string `toml:"scheduler_options"`
	Exclusive        bool   `toml:"exclusive"`
	// Launcher starts the worker inside the job: "srun" (the default, one
	// worker per node) or "none" (the batch script runs the worker itself,
	// on the first node only).
	Launcher string `toml:"launcher"`
}

// Defaults Validate fills in.
const (
	DefaultWalltime = "01:00:00"
	DefaultMaxIdle  = 120 * time.Second
	LauncherSrun    = "srun"
	LauncherNone    = "none"
)

// Validate fills the defaults and checks every key; the error names each
// bad key (as serve.toml spells it) and what it allows.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("[slurm] "+format, args...))
	}
	for _, f := range []struct {
		key string
		v   *string
	}{{"partition", &c.Partition}, {"account", &c.Account}, {"qos", &c.QOS}, {"constraint", &c.Constraint}} {
		*f.v = strings.TrimSpace(*f.v)
		if !sbatchWord(*f.v) {
			bad("%s = %q: must not contain spaces, quotes, backslashes or control characters", f.key, *f.v)
		}
	}

	c.Walltime = strings.TrimSpace(c.Walltime)
	if c.Walltime == "" {
		c.Walltime = DefaultWalltime
	}
	if d, err := parseWalltime(c.Walltime); err != nil {
		bad("walltime = %q: %v", c.Walltime, err)
	} else if d <= 0 {
		bad("walltime = %q: must be more than zero (the pilot's time limit, e.g. %q)", c.Walltime, DefaultWalltime)
	}

	switch {
	case c.NodesPerBlock < 0:
		bad("nodes_per_block = %d: must be 1 or more", c.NodesPerBlock)
	case c.NodesPerBlock == 0:
		c.NodesPerBlock = 1
	}
	if c.CPUsPerTask < 0 {
		bad("cpus_per_task = %d: must be 1 or more (or left out)", c.CPUsPerTask)
	}
	c.Mem = strings.TrimSpace(c.Mem)
	if c.Mem != "" && !validMem(c.Mem) {
		bad("mem = %q: want a number of megabytes or one with a K, M, G or T suffix, as sbatch --mem takes (e.g. \"8G\")", c.Mem)
	}

	if c.MaxBlocks < 0 {
		bad("max_blocks = %d: must be 1 or more", c.MaxBlocks)
	} else if c.MaxBlocks == 0 {
		c.MaxBlocks = 1
	}
	if c.MinBlocks < 0 {
		bad("min_blocks = %d: must be 0 or more", c.MinBlocks)
	}
	if c.InitBlocks < 0 {
		bad("init_blocks = %d: must be 0 or more", c.InitBlocks)
	}
	if c.MaxBlocks > 0 && c.MinBlocks > c.MaxBlocks {
		bad("min_blocks = %d is more than max_blocks = %d: lower min_blocks or raise max_blocks", c.MinBlocks, c.MaxBlocks)
	}
	if c.MaxBlocks > 0 && c.InitBlocks > c.MaxBlocks {
		bad("init_blocks = %d is more than max_blocks = %d: lower init_blocks or raise max_blocks", c.InitBlocks, c.MaxBlocks)
	}

	switch {
	case c.MaxIdle.Duration < 0:
		bad("max_idle = %s: must not be negative", c.MaxIdle)
	case c.MaxIdle.Duration == 0:
		c.MaxIdle.Duration = DefaultMaxIdle
	}

	if strings.ContainsRune(c.WorkerInit, 0) {
		bad("worker_init: contains a NUL byte")
	}
	for i, line := range strings.Split(c.SchedulerOptions, "\n") {
		line = strings.TrimSpace(line)
		if line != "" && !strings.HasPrefix(line, "#") {
			bad("scheduler_options line %d %q: want #SBATCH lines only (shell commands go in worker_init)", i+1, line)
		}
		if strings.ContainsRune(line, 0) {
			bad("scheduler_options line %d: contains a NUL byte", i+1)
		}
	}

	switch c.Launcher = strings.TrimSpace(c.Launcher); c.Launcher {
	case "":
		c.Launcher = LauncherSrun
	case LauncherSrun, LauncherNone:
	default:
		bad("launcher = %q: want %q (one worker per node) or %q (the batch script runs the worker)", c.Launcher, LauncherSrun, LauncherNone)
	}
	return errors.Join(errs...)
}

// WalltimeDuration is Walltime as a duration (0 when it does not parse;
// Validate reports that).
func (c Config) WalltimeDuration() time.Duration {
	d, _ := parseWalltime(c.Walltime)
	return d
}

// sbatchWord reports whether s can stand unquoted after "#SBATCH --key=".
func sbatchWord(s string) bool {
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) || r == '"' || r == '\'' || r == '\\' {
			return false
		}
	}
	return true
}

func validMem(s string) bool {
	digits := strings.TrimRight(s, "KMGTkmgt")
	if len(s)-len(digits) > 1 || digits == "" {
		return false
	}
	_, err := strconv.ParseUint(digits, 10, 32)
	return err == nil
}

// parseWalltime parses a time limit the way sbatch --time does:
// "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
// "days-hours:minutes" and "days-hours:minutes:seconds".
func parseWalltime(s string) (time.Duration, error) {
	const want = `want HH:MM:SS, D-HH:MM:SS, MM:SS or minutes, as sbatch --time takes (e.g. "01:00:00")`
	days, rest, hasDays := strings.Cut(s, "-")
	if !hasDays {
		days, rest = "", s
	}
	parts := strings.Split(rest, ":")
	if len(parts) > 3 {
		return 0, errors.New(want)
	}
	nums := make([]int64, len(parts))
	for i, p := range parts {
		n, err := walltimeField(p)
		if err != nil {
			return 0, errors.New(want)
		}
		nums[i] = n
	}
	var d, h, m, sec int64
	if hasDays {
		n, err := walltimeField(days)
		if err != nil {
			return 0, errors.New(want)
		}
		d = n
		// days-hours[:minutes[:seconds]]
		h = nums[0]
		if len(nums) > 1 {
			m = nums[1]
		}
		if len(nums) > 2 {
			sec = nums[2]
		}
	} else {
		switch len(nums) {
		case 1: // minutes
			m = nums[0]
		case 2: // minutes:seconds
			m, sec = nums[0], nums[1]
		case 3: // hours:minutes:seconds
			h, m, sec = nums[0], nums[1], nums[2]
		}
	}
	total := ((d*24+h)*60+m)*60 + sec
	if total > int64(math.MaxInt64/time.Second) {
		return 0, errors.New("out of range")
	}
	return time.Duration(total) * time.Second, nil
}

// walltimeField is one number of a time limit: digits only, small enough
// that the total cannot overflow.
func walltimeField(s string) (int64, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, errors.New("not a number")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n > 1_000_000 {
		return 0, errors.New("out of range")
	}
	return n, nil
}

// Duration is a TOML duration: a number of seconds (max_idle = 120, or
// 1.5) or a Go duration string (max_idle = "2m").
//
// It is a struct, not a named time.Duration: go-toml stores a TOML integer
// straight into an integer kind, so max_idle = 120 would silently become
// 120 ns; for a struct it calls UnmarshalText with the integer's text.
type Duration struct{ time.Duration }

// UnmarshalText accepts seconds ("120", "1.5") or a Go duration ("2m").
func (d *Duration) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if s == "" {
		d.Duration = 0
		return nil
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil && !strings.ContainsAny(s, "xXpPnN_") {
		if f < 0 || f*float64(time.Second) >= math.MaxInt64 {
			return fmt.Errorf("%s seconds: out of range (want 0 or more)", s)
		}
		d.Duration = time.Duration(f * float64(time.Second))
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q: want seconds (120) or a duration such as \"2m\"", s)
	}
	if v < 0 {
		return fmt.Errorf("%q: must not be negative", s)
	}
	d.Duration = v
	return nil
}

// MarshalText writes the Go duration string ("2m0s").
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// BlocksWanted is the scaling rule: ceil((queued+running)/slotsPerBlock)
// clamped to [min_blocks, max_blocks]; slotsPerBlock <= 0 counts as 1,
// and an unset max_blocks as 1.
func BlocksWanted(cfg Config, queued, running, slotsPerBlock int) int {
	if slotsPerBlock <= 0 {
		slotsPerBlock = 1
	}
	n := max(queued, 0) + max(running, 0)
	if n < 0 { // overflow
		n = math.MaxInt
	}
	want := n / slotsPerBlock
	if n%slotsPerBlock != 0 {
		want++
	}
	hi := cfg.MaxBlocks
	if hi <= 0 {
		hi = 1
	}
	return min(max(want, cfg.MinBlocks), hi)
}
