package main

import (
	"fmt"
	"io"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/build/kernel"
	"github.com/kiln-dev/kiln/internal/size"
)

func newKernelCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kernel",
		Short: "Build and list kiln's own guest kernel",
		Long: `kiln's own kernel ("minimal", the default kernel of kiln.toml) is Debian's
linux-source built from a small config fragment onto tinyconfig, with every
driver built in and no modules. It is built once per machine into the kiln
cache (several minutes), the first time an image needs it or with
` + "`kiln kernel build`" + `, and reused by every later build.`,
		Example: `  kiln kernel build
  kiln kernel ls --json`,
	}
	cmd.AddCommand(newKernelBuildCmd(a), newKernelLsCmd(a))
	return cmd
}

// kernelJSON is how kiln kernel build and ls print a kernel.
type kernelJSON struct {
	Kind           string  `json:"kind"`
	Release        string  `json:"release"`
	SourcePackage  string  `json:"source_package"`
	SourceVersion  string  `json:"source_version"`
	FragmentSHA256 string  `json:"fragment_sha256"`
	ConfigSHA256   string  `json:"config_sha256"`
	VmlinuxSHA256  string  `json:"vmlinux_sha256"`
	VmlinuxSize    int64   `json:"vmlinux_size"`
	BuildSeconds   float64 `json:"build_seconds"`
	Current        bool    `json:"current"` // built from this kiln's fragment
	Path           string  `json:"path"`
}

func toKernelJSON(k *kernel.Kernel) kernelJSON {
	b := k.Build
	return kernelJSON{
		Kind: k.Kind, Release: k.Version, SourcePackage: k.Package, SourceVersion: k.PackageVersion,
		FragmentSHA256: b.FragmentSHA256, ConfigSHA256: b.ConfigSHA256, VmlinuxSHA256: b.VmlinuxSHA256,
		VmlinuxSize: b.VmlinuxSize, BuildSeconds: b.BuildSeconds, Current: b.FragmentSHA256 == kernel.FragmentDigest(), Path: k.Vmlinuz,
	}
}

func newKernelBuildCmd(a *app) *cobra.Command {
	var asJSON bool
	var jobs int
	cmd := &cobra.Command{
		Use:   "build",
		Short: "Build kiln's kernel into the cache, unless it is there",
		Long: `Build builds kiln's kernel from its config fragment on Debian's current
linux-source package (downloaded through apt, never installed), or does
nothing when the cache already has that build. It needs make, gcc, flex,
bison, bc and libelf-dev (scripts/deps.sh installs them); the first build
takes several minutes, and another kiln process waits for it rather than
building it twice.`,
		Example: `  kiln kernel build
  kiln kernel build --jobs 4 --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			w := a.stdout
			if asJSON {
				w = a.stderr
			}
			p := newProgress(w)
			t0 := time.Now()
			k, err := kernel.Minimal(cmd.Context(), kernel.BuildOptions{Log: a.logger(), Progress: p.step, Tick: plainTicker(p), Jobs: jobs})
			if err != nil {
				p.fail()
				return err
			}
			if asJSON {
				return a.printJSON(toKernelJSON(k))
			}
			verb := "cached"
			if p.n > 0 {
				verb = fmt.Sprintf("built in %s", time.Since(t0).Round(time.Second))
			}
			_, err = fmt.Fprintf(a.stdout, "kernel %s (%s %s) %s\nvmlinux %s, %s, sha256:%s\n", k.Version, k.Package, k.PackageVersion, verb, k.Vmlinuz, size.Format(k.Build.VmlinuxSize), k.Build.VmlinuxSHA256)
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the kernel as JSON (progress goes to stderr)")
	cmd.Flags().IntVarP(&jobs, "jobs", "j", 0, "parallel compile jobs (default: the number of CPUs)")
	return cmd
}

// plainTicker returns a Tick function for a long step: on a terminal the
// live line already shows the step's elapsed time, elsewhere (CI logs, a
// pipe) it prints the news at most every 30 seconds.
func plainTicker(p *progress) func(step, detail string) {
	var mu sync.Mutex
	var last time.Time
	return func(step, detail string) {
		if p.tty {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if time.Since(last) < 30*time.Second {
			return
		}
		last = time.Now()
		fmt.Fprintf(p.w, "    %s: %s\n", step, detail)
	}
}

func newKernelLsCmd(a *app) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Short:   "List the builds of kiln's kernel in the cache",
		Example: "  kiln kernel ls\n  kiln kernel ls --json | jq '.[0].vmlinux_sha256'",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ks, err := kernel.CachedMinimal()
			if err != nil {
				return err
			}
			out := make([]kernelJSON, 0, len(ks))
			for _, k := range ks {
				out = append(out, toKernelJSON(k))
			}
			if asJSON {
				return a.printJSON(out)
			}
			return printKernels(a.stdout, out)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printKernels(w io.Writer, ks []kernelJSON) error {
	if len(ks) == 0 {
		_, err := fmt.Fprintln(w, "no build of kiln's kernel in the cache: `kiln kernel build` makes one (so does the first `kiln build` that needs it)")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RELEASE\tSOURCE\tFRAGMENT\tVMLINUX\tSIZE\tBUILD\tCURRENT")
	for _, k := range ks {
		cur := ""
		if k.Current {
			cur = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s %s\t%s\tsha256:%s\t%s\t%.0fs\t%s\n", k.Release, k.SourcePackage, k.SourceVersion, k.FragmentSHA256[:12], k.VmlinuxSHA256[:16], size.Format(k.VmlinuxSize), k.BuildSeconds, cur)
	}
	return tw.Flush()
}
