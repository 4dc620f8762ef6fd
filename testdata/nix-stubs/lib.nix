# A small stand-in for nixpkgs' lib: just what nix/*.nix use, enough to
# evaluate them without nixpkgs (there is none on the test machines). Option
# declarations are plain attribute sets; ./eval-module.nix applies their
# defaults and checks values against their types.
let
  b = builtins;
  option = o: o // { _type = "option"; };
  leaf = name: check: { inherit name check; };
in
rec {
  inherit (b) elem attrNames concatStringsSep replaceStrings;
  mapAttrsToList = f: set: map (n: f n set.${n}) (b.attrNames set);

  mkOption = option;
  mkEnableOption = name: option { type = types.bool; default = false; description = "Whether to enable ${name}."; };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkDefault = x: x;
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  types = {
    str = leaf "str" b.isString;
    lines = leaf "lines" b.isString;
    bool = leaf "bool" b.isBool;
    package = leaf "package" (x: b.isAttrs x && x ? outPath || b.isString x || b.isPath x);
    ints = {
      positive = leaf "positive integer" (x: b.isInt x && x > 0);
      unsigned = leaf "unsigned integer" (x: b.isInt x && x >= 0);
    };
    enum = vals: leaf "one of ${toString vals}" (x: b.elem x vals);
    strMatching = re: leaf "string matching ${re}" (x: b.isString x && b.match re x != null);
    nullOr = t: { name = "null or ${t.name}"; nullOr = t; };
    listOf = t: { name = "list of ${t.name}"; listOf = t; };
    attrsOf = t: { name = "attrs of ${t.name}"; attrsOf = t; };
    submodule = m: { name = "submodule"; submodule = m; };
  };

  optional = c: x: if c then [ x ] else [ ];
  optionalAttrs = c: x: if c then x else { };
  optionalString = c: s: if c then s else "";
  concatMap = f: l: b.concatLists (map f l);
  unique = b.foldl' (acc: x: if b.elem x acc then acc else acc ++ [ x ]) [ ];
  nameValuePair = name: value: { inherit name value; };
  mapAttrs' = f: set: b.listToAttrs (map (n: f n set.${n}) (b.attrNames set));
  filterAttrs = pred: set: b.listToAttrs (b.concatMap (n: if pred n set.${n} then [{ name = n; value = set.${n}; }] else [ ]) (b.attrNames set));
  hasSuffix = suffix: s:
    let ls = b.stringLength s; lx = b.stringLength suffix;
    in ls >= lx && b.substring (ls - lx) lx s == suffix;
  makeBinPath = l: b.concatStringsSep ":" (map (p: "${p}/bin") l);
  getExe = x: "${x}/bin/${x.meta.mainProgram}";
  escapeShellArg = arg: "'${b.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
  escapeShellArgs = l: b.concatStringsSep " " (map escapeShellArg l);
  cleanSourceWith = { src, filter, name ? "source" }: { _type = "source"; inherit src filter name; };
  platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
  licenses.mit = { spdxId = "MIT"; shortName = "mit"; };
  genAttrs = names: f: b.listToAttrs (map (n: { name = n; value = f n; }) names);
  trivial.release = "26.05";
}
