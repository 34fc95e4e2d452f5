package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/build"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/spec"
)

func newBuildCmd(a *app) *cobra.Command {
	var o build.Options
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "build [PATH]",
		Short: "Build one image file from a kiln.toml spec",
		Long: `Build turns a spec of Python dependencies into ONE image file holding the
interpreter, standard library, packages, their native libraries, a kernel and
kiln's init. The kernel is kiln's own (kernel = "minimal", the default: built
once per machine, several minutes the first time, then cached) or Debian's
cloud kernel (kernel = "debian"). PATH is a directory holding kiln.toml, or the spec file itself
(default: the current directory). Building the same spec twice gives
byte-identical images.`,
		Example: `  kiln build examples/numpy -o numpy.kimg
  kiln build ./kiln.toml --compression none
  kiln build . --json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := ""
			if len(args) == 1 {
				path = args[0]
			}
			s, err := spec.Load(path)
			if err != nil {
				return err
			}
			o.Log = a.logger()
			o.KilnVersion = version
			p := newProgress(a.stderr)
			if !asJSON {
				p = newProgress(a.stdout)
			}
			o.Progress = p.step
			o.Tick = plainTicker(p)
			res, err := build.Build(cmd.Context(), s, o)
			if err != nil {
				p.fail()
				return fmt.Errorf("building %s: %w", s.Name, err)
			}
			if asJSON {
				return a.printJSON(res)
			}
			var total float64
			for _, st := range res.Steps {
				total += st.Elapsed.Seconds()
			}
			_, err = fmt.Fprintf(a.stdout, "built %s (%s) in %.1fs\ndigest sha256:%s\n", res.Path, size.Format(res.Size), total, res.Digest)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVarP(&o.Output, "output", "o", "", "image file to write (default <name>.kimg)")
	f.StringVar(&o.Compression, "compression", "", "rootfs compression: none, lz4 or lz4hc (default: the spec's, else lz4hc)")
	f.StringVar(&o.Kernel, "kernel", "", "use this kernel bzImage instead of the spec's kernel (needs --modules)")
	f.StringVar(&o.Modules, "modules", "", "the lib/modules/<version> directory that goes with --kernel")
	f.StringVar(&o.Init, "init", "", "kiln-init binary (default: $KILN_INIT, or kiln-init next to kiln)")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON (progress goes to stderr)")
	f.StringVar(&o.Filesystem, "filesystem", "erofs", "root filesystem: erofs, or squashfs (zstd) for comparisons")
	_ = f.MarkHidden("filesystem")
	return cmd
}
