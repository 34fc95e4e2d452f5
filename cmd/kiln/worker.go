package main

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/cache"
	"github.com/kiln-dev/kiln/internal/endpoint"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/vm"
)

// envDrainGrace sets --drain-grace's default (worker_init may export it).
const envDrainGrace = "KILN_DRAIN_GRACE"

func newWorkerCmd(a *app) *cobra.Command {
	var url, token, tokenFile, images, cacheDir, memory string
	var slots int
	var vols volumeFlags
	var c endpoint.WorkerConfig
	cmd := &cobra.Command{
		Use:   "worker --endpoint URL [--token-file FILE]",
		Short: "Run an endpoint's tasks on this node (what a Slurm pilot job runs)",
		Long: `Worker connects to a kiln serve endpoint, registers this node's capacity
(CPUs, memory, KVM or TCG), pulls tasks over HTTP (long polls: no inbound
connection to the node) and runs them in local pools of warm VMs, with the
same snapshot restore kiln serve uses, then posts the results back.

kiln serve's Slurm provider starts workers in its pilot jobs; you may also
start one by hand against an endpoint whose provider is "slurm" or "workers".
Images are read where the endpoint found them (a shared filesystem, the same
path on every node) or from --images. Snapshots and the worker's own state
live in --cache (default $KILN_CACHE, else ~/.cache/kiln): node-local scratch
is best.

On SIGTERM (what Slurm sends at walltime and on scancel) the worker takes no
more tasks, lets running ones finish for --drain-grace, hands the rest back
to the endpoint (they run elsewhere) and exits 0. The endpoint declares a
worker lost when it has not heard from it for 15 s (three 5 s heartbeats).`,
		Example: `  kiln worker --endpoint http://login1:8470 --token-file ~/.local/state/kiln/slurm/token
  KILN_TOKEN=... kiln worker --endpoint http://10.1.0.5:8470 --cache /local/scratch/$USER/kiln --slots 8`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if url == "" {
				return errors.New("give --endpoint URL: the address kiln serve printed (for example http://login1:8470)")
			}
			if tokenFile != "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return fmt.Errorf("reading the token file: %w", err)
				}
				token = strings.TrimSpace(string(b))
			}
			c.Endpoint, c.Token = url, cmp.Or(token, os.Getenv(endpoint.EnvToken))
			if cacheDir != "" {
				abs, err := filepath.Abs(cacheDir)
				if err != nil {
					return err
				}
				// Snapshots and verified-image stamps go to the cache dir.
				os.Setenv(cache.EnvVar, abs)
			}
			dir, err := cache.Dir()
			if err != nil {
				return err
			}
			c.StateDir = filepath.Join(dir, "worker")
			if images != "" {
				st, err := os.Stat(images)
				if err != nil || !st.IsDir() {
					return fmt.Errorf("--images %s: not a directory (give the directory that holds the .kimg files)", images)
				}
				c.ImagesDir = images
			}
			if memory != "" {
				n, err := size.Parse(memory)
				if err != nil {
					return fmt.Errorf("--memory: %w", err)
				}
				c.MemoryMiB = int(n >> 20)
			} else if mb, err := strconv.Atoi(os.Getenv("SLURM_MEM_PER_NODE")); err == nil && mb > 0 {
				c.MemoryMiB = mb * 3 / 4 // Slurm's allocation on this node, in MB
			}
			c.CPUs = slurmCPUs()
			c.Slots = cmp.Or(slots, c.CPUs)
			c.Node = cmp.Or(os.Getenv("SLURMD_NODENAME"), hostname())
			c.SlurmJobID = os.Getenv("SLURM_JOB_ID")
			c.BlockID = os.Getenv("KILN_BLOCK_ID")
			c.Version = version
			c.Log = a.logger()
			c.VM = vm.Config{Log: c.Log, Accel: a.accel(), Volumes: vols}
			c.Registered = func(id string) {
				fmt.Fprintf(a.stderr, "kiln: worker %s on %s registered with %s (%d slots)\n", id, c.Node, url, c.Slots)
			}
			return endpoint.RunWorker(cmd.Context(), c)
		},
	}
	vols.add(cmd)
	f := cmd.Flags()
	f.StringVar(&url, "endpoint", "", "the endpoint's URL")
	f.StringVar(&token, "token", "", "API token (default $KILN_TOKEN)")
	f.StringVar(&tokenFile, "token-file", "", "read the API token from this file")
	f.StringVar(&images, "images", "", "directory of image files, instead of the paths the endpoint registered")
	f.StringVar(&cacheDir, "cache", "", "node-local directory for snapshots and the worker's state (default $KILN_CACHE, else ~/.cache/kiln)")
	f.IntVar(&slots, "slots", 0, "tasks run at once, one VM each (default: the CPUs Slurm gave this task, else the node's)")
	f.DurationVar(&c.EndpointTimeout, "endpoint-timeout", endpoint.DefaultEndpointTimeout, "give up (exit 1) when the endpoint has not answered for this long")
	f.StringVar(&memory, "memory", "", "cap on the VMs' total memory, e.g. 48G (default: 3/4 of Slurm's --mem on this node, else of the host's RAM)")
	grace := endpoint.DefaultDrainGrace
	if d, err := time.ParseDuration(os.Getenv(envDrainGrace)); err == nil && d > 0 {
		grace = d
	}
	f.DurationVar(&c.DrainGrace, "drain-grace", grace, "on SIGTERM, how long running tasks may finish before they are handed back; keep it under Slurm's KillWait (default $"+envDrainGrace+" if set)")
	return cmd
}

// slurmCPUs is the CPUs this worker may use: what Slurm gave the task,
// else the node's.
func slurmCPUs() int {
	for _, k := range []string{"SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"} {
		if n, err := strconv.Atoi(os.Getenv(k)); err == nil && n > 0 {
			return min(n, runtime.NumCPU())
		}
	}
	return runtime.NumCPU()
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "unknown-node"
	}
	return h
}
