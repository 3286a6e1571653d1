// Package klogflags puts klog's flags (-v, --logtostderr, ...) on a cobra
// command's flag set with dashes for underscores, as upstream's binaries
// accept them; verbosity starts at 4, upstream's default.
package klogflags

import (
	"flag"
	"strings"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"
)

func Add(fs *pflag.FlagSet) {
	gfs := flag.NewFlagSet("klog", flag.ExitOnError)
	klog.InitFlags(gfs)
	_ = gfs.Set("v", "4")
	gfs.VisitAll(func(f *flag.Flag) {
		f.Name = strings.ReplaceAll(f.Name, "_", "-")
		fs.AddGoFlag(f)
	})
}
