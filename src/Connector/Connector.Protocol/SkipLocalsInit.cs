// Locals are not zero-initialized in this assembly: the only stackalloc (a frame header that spans
// pipe segments) is fully overwritten by CopyTo before it is read.
[module: System.Runtime.CompilerServices.SkipLocalsInit]
